//! moeru-data: tokenize, pack and stream Parquet token datasets.
//!
//! - [`prepare`]: inputs (JSONL, Parquet, text) → zstd Parquet shards of `input_ids` /
//!   `loss_mask` plus `manifest.json`, written atomically.
//! - [`chat`]: the Qwen3 ChatML template and the assistant loss mask.
//! - [`loader`]: the streaming, packing, shuffling, DP-splitting, exactly resumable loader
//!   that yields [`PackedSample`]s.
//! - [`pairs`]: preference (DPO) pairs — their storage as documents and the [`PairLoader`];
//!   [`preference`] tokenizes them at prepare time as TRL 1.16 does.
//! - [`cli`]: the `moeru data …` subcommands.

pub mod chat;
pub mod cli;
mod column;
pub mod error;
pub mod fsutil;
pub mod input;
mod input_arrow;
mod input_pref;
pub mod loader;
pub mod manifest;
pub mod pairs;
mod plain_pages;
pub mod preference;
pub mod prepare;
pub mod prompts;
pub mod reader;
pub mod rng;
pub mod sample;
pub mod shard_writer;
pub mod stream;
pub mod tokenizer;

pub use error::{DataError, Location, Result};
pub use loader::{DataLoader, LoaderConfig, LoaderState, StreamKind};
pub use manifest::Manifest;
pub use pairs::{PairLoader, PairLoaderConfig, PreferencePair};
pub use prepare::{prepare, PrepareOptions, PrepareReport};
pub use sample::{PackMode, PackedSample};
pub use stream::Position;
