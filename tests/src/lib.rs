//! Test-only crate: see tests/*.rs and reference/.
