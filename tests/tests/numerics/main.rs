//! Numerics against transformers: f32 parity (parity.rs) and bf16 autocast (precision.rs).
//! One test binary, so a GPU run carries one (scripts/gpu-prepare.sh); `MOERU_TEST_DEVICE`
//! picks the device.

#[path = "../common/mod.rs"]
mod common;
mod parity;
mod precision;
