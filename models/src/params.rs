//! How a model gets its parameters and how callers walk them.
//!
//! Parameters carry their Hugging Face in-memory names (transformers 5.x `named_parameters()`):
//! `model.layers.3.self_attn.q_proj.weight`, and for MoE layers the stacked expert tensors
//! `model.layers.3.mlp.experts.gate_up_proj` `[E, 2·I, H]` and `…experts.down_proj` `[E, H, I]`.
//! Linear weights keep the `[out, in]` layout; the checkpoint crate maps to and from files.

use burn::tensor::{Device, Tensor, TensorData};

use crate::shard::{narrow_param, Split};

/// Supplies the value of each parameter while a model is being built.
pub trait ParamSource {
    type Error;
    /// The tensor named `name`, which must have exactly `shape`.
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, Self::Error>;

    /// The part `split` of the tensor named `name` whose full shape is `full` (see
    /// `shard.rs`). By default the whole tensor is read and narrowed; sources that can read
    /// a slice directly (random init, memory-mapped files) do so.
    fn tensor_part<const D: usize>(
        &mut self,
        name: &str,
        full: [usize; D],
        split: &Split,
        device: &Device,
    ) -> Result<Tensor<D>, Self::Error> {
        Ok(narrow_param(self.tensor(name, full, device)?, split))
    }
}

/// Visits every parameter of a model, by name, in a fixed order.
pub trait ParamVisitor {
    fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>);
}

/// Implemented by every module that owns parameters.
pub trait Params {
    fn visit_params<V: ParamVisitor>(&mut self, visitor: &mut V);
}

/// Builds a tensor on `device`, tracked for gradients when the device is an autodiff device.
pub fn param_from_data<const D: usize>(data: TensorData, device: &Device) -> Tensor<D> {
    let t = Tensor::<D>::from_data(data, device);
    if device.is_autodiff() {
        t.require_grad()
    } else {
        t
    }
}

/// Every parameter's name and shape, in visiting order.
pub fn param_shapes<M: Params>(model: &mut M) -> Vec<(String, Vec<usize>)> {
    struct Shapes(Vec<(String, Vec<usize>)>);
    impl ParamVisitor for Shapes {
        fn visit<const D: usize>(&mut self, name: &str, param: &mut Tensor<D>) {
            self.0.push((name.to_string(), param.dims().to_vec()));
        }
    }
    let mut v = Shapes(Vec::new());
    model.visit_params(&mut v);
    v.0
}

/// Total number of scalar parameters.
pub fn param_count<M: Params>(model: &mut M) -> usize {
    param_shapes(model)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// A float tensor's values on the host, as f32.
pub fn to_f32_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("a float tensor converts to f32")
}
