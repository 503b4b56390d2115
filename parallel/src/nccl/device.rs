//! The device path of `flat::run` for burn's CUDA tensors: NCCL reads and writes the tensor's
//! own GPU memory, so no collective copies through the host (design note §10: host staging
//! of every expert dispatch and gradient would cost more than the compute).
//!
//! Owns: finding a CUDA tensor's memory behind burn's fusion and dispatch layers, ordering the
//! NCCL call after the kernels that wrote it, and handing the result back to burn. Must not:
//! change what an op computes (the host path is the reference) or keep a buffer past a call.
//!
//! burn's CUDA tensors are `Fusion<CubeBackend>` tensors: resolving one runs its pending
//! fused kernels and gives the cubecl buffer; `get_resource` gives that buffer's address and
//! keeps it in place while held. The tensor ops reach this with the inner backend (`Cube`),
//! the gradient buckets with `Dispatch`; any other tensor, a tensor on another GPU, a dtype
//! without a wire type here (f16) or a backend without device collectives takes the host path.

use std::any::Any;

use burn::backend::{Backend, BackendTensor, Cube, DispatchTensor, DispatchTensorKind};
use burn::tensor::{DType as TensorDType, FloatDType, Shape};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::Device as CubeDevice;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{kernel::into_contiguous, CubeBackend};
use burn_fusion::stream::StreamId;
use burn_fusion::{FusionTensor, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};
use cubecl_runtime::runtime::Runtime;

use super::api::backend;
use crate::comm::{DType, DeviceCollectives};
use crate::error::Result;
use crate::flat::Collective;
use crate::group::ProcessGroup;

type CudaServer = <CudaRuntime as Runtime>::Server;
type FusedCuda = burn_cubecl::fusion::FusionCubeRuntime;
type CubeFloat = <Cube as burn::backend::BackendTypes>::FloatTensorPrimitive;

/// `op` on `x`'s GPU memory when the group has device collectives and `x` is a CUDA tensor
/// on their GPU: `Ok` with the result. `Err(x)` hands `x` back for the host path.
pub(crate) fn run<B: Backend>(
    x: B::FloatTensorPrimitive,
    group: &ProcessGroup,
    op: &Collective,
    out: &Shape,
) -> std::result::Result<Result<B::FloatTensorPrimitive>, B::FloatTensorPrimitive> {
    let Some(device) = group.device() else {
        return Err(x);
    };
    // The tensor ops run on the inner backend (Cube), the gradient buckets on Dispatch.
    let x = match cast::<_, CubeFloat>(x) {
        Ok(t) if reachable(&t, device) => {
            return Ok(on_gpu(t, group, device, op, out).map(same));
        }
        Ok(t) => return Err(same(t)),
        Err(x) => x,
    };
    let tensor = cast::<_, DispatchTensor>(x)?;
    let autodiff = tensor.autodiff;
    match tensor.kind {
        DispatchTensorKind::Cube(BackendTensor::Float(t)) if reachable(&t, device) => {
            let done = on_gpu(t, group, device, op, out).map(|t| {
                let kind = DispatchTensorKind::Cube(BackendTensor::Float(t));
                same(DispatchTensor { kind, autodiff })
            });
            Ok(done)
        }
        kind => Err(same(DispatchTensor { kind, autodiff })),
    }
}

/// `t` as a `U` when it is one, else `t` back.
fn cast<T: 'static, U: 'static>(t: T) -> std::result::Result<U, T> {
    let boxed: Box<dyn Any> = Box::new(t);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(b) => Err(*b.downcast::<T>().expect("the value put in just now")),
    }
}

/// A value whose type the caller's generic type is, checked by `run`'s casts.
fn same<T: 'static, U: 'static>(t: T) -> U {
    cast::<T, U>(t)
        .ok()
        .expect("run checked that the two types are one")
}

/// On the communicator's GPU, in a dtype NCCL moves as is.
fn reachable(t: &FusionTensor<FusedCuda>, device: &dyn DeviceCollectives) -> bool {
    let on_it =
        matches!(t.client.device(), CubeDevice::Cuda(d) if d.index == device.device_ordinal());
    on_it && matches!(t.dtype, TensorDType::F32 | TensorDType::BF16)
}

/// Zeros on `B` (a generic bound puts the float ops in scope).
fn zeros<B: Backend>(
    shape: Shape,
    device: &B::Device,
    dtype: FloatDType,
) -> B::FloatTensorPrimitive {
    B::float_zeros(shape, device, dtype)
}

fn wire(dtype: TensorDType) -> DType {
    match dtype {
        TensorDType::BF16 => DType::BF16,
        _ => DType::F32,
    }
}

/// The collective on the GPU: a fresh output buffer, every kernel before it finished, NCCL on
/// both buffers' addresses, the output handed back to fusion as a new tensor.
fn on_gpu(
    x: FusionTensor<FusedCuda>,
    group: &ProcessGroup,
    device: &dyn DeviceCollectives,
    op: &Collective,
    out: &Shape,
) -> Result<FusionTensor<FusedCuda>> {
    let failed = |what: &str, e: String| {
        backend(format!(
            "{} on group `{}`: {what}: {e}",
            op.name(),
            group.name()
        ))
    };
    let (client, dtype) = (x.client.clone(), x.dtype);
    let cube_device = client.device().clone();
    let input: CubeTensor = into_contiguous(client.clone().resolve_tensor_float::<CubeBackend>(x));
    let send_elems = input.meta.shape().num_elements();
    let output: CubeTensor =
        zeros::<CubeBackend>(out.clone(), &cube_device, FloatDType::from(dtype));
    // NCCL runs on its own stream: the kernels writing `input` and zeroing `output` first.
    CubeBackend::sync(&cube_device).map_err(|e| failed("waiting for the GPU", format!("{e:?}")))?;
    let resource = |t: &CubeTensor| {
        t.client
            .get_resource::<CudaServer>(t.handle.clone())
            .map_err(|e| failed("the tensor's memory", format!("{e:?}")))
    };
    let (send, recv) = (resource(&input)?, resource(&output)?);
    let buffers = (send.resource().ptr, recv.resource().ptr);
    // SAFETY: both resources are this GPU's buffers of the op's input and output sizes, held
    // in place until they drop after the call; the sync above left no kernel using them.
    unsafe { group.run_on_device(device, op, wire(dtype), buffers, send_elems)? };
    drop((send, recv, input));
    let shape = out.clone();
    let handle = CubeBackend::float_tensor_handle(output);
    let init = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let noop = NoOp::<CubeBackend>::new();
    Ok((client.register(StreamId::current(), OperationIr::Init(init), noop)).output())
}
