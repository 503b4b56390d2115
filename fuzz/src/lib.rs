//! moeru's fuzzing harness on stable Rust: a deterministic mutation engine, the targets
//! (every parser and loader that reads files or bytes a user or a peer supplies) and a
//! runner that counts outcomes and keeps the inputs that panic.
//!
//! Owns: the mutation engine ([`mutate`], seeded by [`rng::Rng`], no global state), the
//! [`targets`] (each calls the real moeru function on a mutated real file), the [`runner`]
//! (`catch_unwind`, counts, regression inputs under `fuzz/regressions/<target>/`) and the
//! allocation cap ([`alloc::CappedAlloc`]) a fuzz test binary installs.
//!
//! Must not: reimplement or weaken any parser it tests (a target calls the same public
//! function the trainer calls), depend on anything not deterministic in the seed except the
//! wire targets' timing, write into the source tree unless asked (`MOERU_FUZZ_SAVE=1`), or
//! let one iteration grow without bound (inputs are capped, sockets time out, a watchdog
//! aborts a hang).
//!
//! Run: `cargo test -p moeru-fuzz --test fuzz` (a bounded CI run), or
//! `scripts/fuzz.sh 100000 [SEED]` by hand.

pub mod alloc;
pub mod mutate;
pub mod rng;
pub mod runner;
pub mod targets;

pub use runner::{run_one, run_target, Stats, Target};
