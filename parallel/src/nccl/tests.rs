//! Without the CUDA driver and NCCL (CI, CPU machines) these check that the failure is a clear
//! error rather than cudarc's panic; on a machine with a GPU they run a one-rank world through
//! every op (NCCL allows one rank per GPU per process, so more ranks need a launcher).

use std::time::Duration;

use super::*;
use crate::comm::Communicator;
use crate::store::StoreServer;

fn store() -> (StoreServer, StoreClient) {
    let server = StoreServer::bind("127.0.0.1:0", "t").unwrap();
    let addr = server.addr().to_string();
    let client = StoreClient::connect(&addr, "t", Duration::from_secs(5)).unwrap();
    (server, client)
}

#[test]
fn missing_nccl_is_a_clear_error() {
    // A library that is found but unusable (too old, MOERU_NCCL_LIB at another file) says so.
    match api::load_nccl() {
        Err(detail) if detail.starts_with("libnccl.so.2 not found") => {
            for hint in [
                "pip install nvidia-nccl-cu12",
                "LD_LIBRARY_PATH",
                "MOERU_NCCL_LIB",
            ] {
                assert!(detail.contains(hint), "{detail}");
            }
        }
        Err(detail) => assert!(detail.contains("NCCL"), "{detail}"),
        Ok(_) => {}
    }
}

#[test]
fn world_of_one_or_a_backend_error() {
    let (_server, client) = store();
    let comm = match nccl_comm(&client, "t", 0, 1, 0, Duration::from_secs(60)) {
        Err(CommError::Backend { backend, detail }) if probe().is_err() => {
            assert_eq!(backend, "nccl");
            assert!(detail.starts_with("cannot use NCCL: "), "{detail}");
            return;
        }
        Err(e) => panic!("{e}"),
        Ok(comm) => comm,
    };
    let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
    let mut buf = f32s(&[1.0, -2.0, 3.5]);
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        comm.all_reduce(&mut buf, DType::F32, op).unwrap();
        assert_eq!(buf, f32s(&[1.0, -2.0, 3.5]), "{op:?}");
    }
    let mut ints = 7i64.to_le_bytes().to_vec();
    comm.all_reduce(&mut ints, DType::I64, ReduceOp::Mean)
        .unwrap();
    assert_eq!(ints, 7i64.to_le_bytes());
    let mut out = vec![0u8; 12];
    comm.all_gather(&buf, &mut out).unwrap();
    assert_eq!(out, buf);
    comm.reduce_scatter(&buf, &mut out, DType::F32, ReduceOp::Sum)
        .unwrap();
    assert_eq!(out, buf);
    assert_eq!(comm.all_to_all(b"abc", &[3], &[3]).unwrap(), b"abc");
    let mut b = b"xyz".to_vec();
    comm.broadcast(&mut b, 0).unwrap();
    assert_eq!(b, b"xyz");
    comm.barrier().unwrap();
    let mut sub = comm.split_nccl(5, "sub").unwrap();
    assert_eq!(sub.info().members, vec![0]);
    sub.barrier().unwrap();
    // A receive nobody sends to: times out, aborts the sub-communicator, leaves the parent.
    sub.timeout = Duration::from_millis(500);
    let err = sub.recv(&mut [0u8; 4], 0, 0).unwrap_err();
    assert!(matches!(err, CommError::Timeout { .. }), "{err}");
    assert!(matches!(sub.barrier(), Err(CommError::Aborted { .. })));
    comm.barrier().unwrap();
}

/// On a GPU: the flat collectives on a CUDA tensor run on its own memory (counted as device
/// calls), give the values the host path gives (a one-rank world: the input), and leave the
/// result on the GPU, in f32 and in bf16.
#[test]
fn gpu_tensors_skip_the_host() {
    use crate::flat::{all_gather_flat, all_reduce_flat, flat, reduce_scatter_flat, Collective};
    use burn::tensor::{Device, FloatDType, Tensor};
    let (_server, client) = store();
    let comm = match nccl_comm(&client, "d", 0, 1, 0, Duration::from_secs(60)) {
        Err(e) if probe().is_err() => return assert!(matches!(e, CommError::Backend { .. })),
        other => other.unwrap(),
    };
    let group = ProcessGroup::new(Box::new(comm));
    let device = Device::cuda(0);
    let host = |t: Tensor<1>| -> Vec<f32> { t.into_data().convert::<f32>().try_to_vec().unwrap() };
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        let x = Tensor::<1>::from_floats([1.0, -2.0, 3.5, 4.0], &device).cast(dtype);
        let swap = Collective::AllToAll {
            send: vec![4],
            recv: vec![4],
        };
        let outs = [
            all_reduce_flat(x.clone(), &group, ReduceOp::Sum).unwrap(),
            reduce_scatter_flat(x.clone(), &group).unwrap(),
            all_gather_flat(x.clone(), &group).unwrap(),
            flat(x.clone(), &group, &swap).unwrap(),
        ];
        for out in outs {
            assert_eq!((out.device(), out.dtype()), (device.clone(), x.dtype()));
            assert_eq!(host(out), host(x.clone()));
        }
    }
    let traffic = group.traffic();
    for op in ["all_reduce", "reduce_scatter", "all_gather", "all_to_all"] {
        assert_eq!(traffic[op].device_calls, 2, "{op}: {:?}", traffic[op]);
    }
}
