//! Model weights on disk: Hugging Face folders in and out (this issue), moeru checkpoints later.

pub mod error;
pub mod hf_export;
pub mod hf_load;
pub mod tensor_file;

pub use error::CheckpointError;
pub use hf_export::{export_hf, hf_tensors};
pub use hf_load::{load_hf_model, HfFolder};
pub use tensor_file::{write_tensors, OwnedTensor, TensorFile};
