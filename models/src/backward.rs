//! What the custom backwards of moeru's ops share: handing each input's gradient to autodiff.

use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::NodeId;
use burn::backend::tensor::FloatTensor;
use burn::backend::Backend;

/// Registers `input_grads[i]` for parent `i` of an op, skipping the parents that need none
/// (`parents`: the op's `ops.parents` mapped to their ids).
pub(crate) fn register_input_grads<B: Backend, const N: usize>(
    parents: [Option<NodeId>; N],
    input_grads: [FloatTensor<B>; N],
    grads: &mut Gradients,
) {
    for (parent, g) in parents.into_iter().zip(input_grads) {
        if let Some(id) = parent {
            grads.register::<B>(id, g);
        }
    }
}
