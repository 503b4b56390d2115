//! Shared helpers: the committed reference fixtures and numeric comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use moeru_checkpoints::TensorFile;

pub const REFERENCE_MODELS: &[&str] = &[
    "qwen3-dense-tied",
    "qwen3-dense-kv1-bf16",
    "qwen3-moe-mixed",
    "qwen3-moe-norm-sharded",
];

/// tests/reference, or `MOERU_REFERENCE_DIR` (a test binary carried to another machine).
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("MOERU_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference"),
    }
}

/// The device the parity tests run on: `MOERU_TEST_DEVICE` (`cpu` unless set; `cuda` or
/// `cuda:N` in a build with `--features cuda`).
pub fn test_device() -> burn::tensor::Device {
    let spec = std::env::var("MOERU_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let spec: moeru_models::DeviceSpec = spec.parse().unwrap_or_else(|e| panic!("{e}"));
    spec.open(0).unwrap_or_else(|e| panic!("{e}"))
}

/// `cpu` on the CPU, else `gpu`: GPU matmuls may run f32 as TF32 (10-bit mantissa inputs).
pub fn tol<T>(cpu: T, gpu: T) -> T {
    match std::env::var("MOERU_TEST_DEVICE") {
        Ok(d) if d != "cpu" => gpu,
        _ => cpu,
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    reference_dir().join("models").join(name)
}

/// The transformers outputs for reference model `name`.
pub fn outputs(name: &str) -> TensorFile {
    let path = reference_dir()
        .join("outputs")
        .join(format!("{name}.safetensors"));
    TensorFile::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn f32s(file: &TensorFile, name: &str) -> (Vec<f32>, Vec<usize>) {
    file.f32(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn i64s(file: &TensorFile, name: &str) -> (Vec<i64>, Vec<usize>) {
    file.i64(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ‖a − b‖ / ‖b‖ (0 when both are zero).
pub fn relative_error(a: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(a.len(), reference.len(), "length mismatch");
    let diff: f64 = a
        .iter()
        .zip(reference)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference
        .iter()
        .map(|y| (*y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

#[allow(unused_imports)]
pub use moeru_models::params::to_f32_vec;

/// Copies a model folder (flat) into a fresh temporary directory.
pub fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model_dir(name)).expect("model folder") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    tmp
}

/// Every tensor of a Hugging Face folder as f32, by name.
pub fn folder_tensors(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("folder") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let file = TensorFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            for (name, shape) in file.shapes() {
                out.insert(name.clone(), (shape, f32s(&file, &name).0));
            }
        }
    }
    out
}

/// transformers' outputs for reference model `name` under torch.autocast(bfloat16)
/// (make_bf16_reference.py).
pub fn outputs_bf16(name: &str) -> TensorFile {
    let path = reference_dir()
        .join("outputs-bf16")
        .join(format!("{name}.safetensors"));
    TensorFile::open(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Every parameter's gradient by name; parameters and gradients must be f32 (the master
/// copy, also under bf16 mixed precision).
pub struct Grads<'a> {
    pub grads: &'a burn::tensor::Gradients,
    pub out: std::collections::BTreeMap<String, Vec<f32>>,
}

impl moeru_models::params::ParamVisitor for Grads<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut burn::tensor::Tensor<D>) {
        use burn::tensor::DType;
        assert_eq!(param.dtype(), DType::F32, "parameter {name} is not f32");
        let g = param
            .grad(self.grads)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), DType::F32, "gradient of {name} is not f32");
        self.out.insert(name.to_string(), to_f32_vec(g));
    }
}
