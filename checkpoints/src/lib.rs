//! Model weights on disk: Hugging Face folders in and out, and moeru training checkpoints.

pub mod error;
pub mod generation_config;
pub mod hf_export;
pub mod hf_load;
pub mod peft_adapter;
pub mod peft_config;
pub mod run_checkpoint;
pub mod tensor_file;

pub use error::CheckpointError;
pub use generation_config::StopIds;
pub use hf_export::{export_hf, held_named_tensors, hf_param_tensors, hf_tensors, named_tensors};
pub use hf_load::{load_hf_model, load_hf_model_sharded, HfFolder, INDEX_FILE};
pub use peft_adapter::{
    export_merged_hf, load_peft_adapter, peft_adapter_files, peft_adapter_files_of,
    read_peft_lora_config, save_peft_adapter,
};
pub use peft_config::{PeftAdapterConfig, PeftError};
pub use run_checkpoint::{
    begin_checkpoint, commit_checkpoint, latest_valid_checkpoint, verify_checkpoint,
    write_contents, CheckpointContents, HeldTensors, LatestCheckpoint, Manifest,
};
pub use tensor_file::{write_tensors, OwnedTensor, TensorFile};
