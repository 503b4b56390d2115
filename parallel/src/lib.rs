//! moeru's distributed runtime: the `Communicator` trait and its backends (in-process
//! threads, TCP processes, MPI, NCCL), process groups as values, the device mesh, the TCP
//! rendezvous store, launch-environment detection, data-parallel gradient sync with ZeRO-1
//! sharding, and differentiable collectives on burn tensors (`tensor_ops`). Model code never
//! calls into this crate directly.

pub mod bind;
pub mod boundaries;
pub mod comm;
pub mod error;
pub mod flat;
pub mod group;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
mod p2p;
pub mod tensor_ops;
pub mod threads;
pub mod transport;

#[cfg(feature = "mpi")]
pub use crate::mpi::mpi_world;
pub use comm::{Communicator, DType, GroupInfo, ReduceOp};
pub use error::{CommError, Result};
pub use flat::{all_gather_flat, all_reduce_flat, reduce_scatter_flat, Collective};
pub use group::{Elem, OpTraffic, ProcessGroup, Traffic};
#[cfg(feature = "cuda")]
pub use nccl::nccl_world;
pub use tensor_ops::{
    all_reduce_max, all_to_all_rows, sp_gather, sp_reduce_scatter, tp_copy, tp_reduce, CommHandle,
};
pub use threads::thread_world;
pub mod env;
pub mod mesh;
pub mod store;
pub mod tcp;
pub mod zero;

pub use bind::bind_ip;
pub use env::{LaunchEnv, Launcher};
pub use mesh::{DeviceMesh, GroupKind, MeshGroups, MeshSizes};
pub use store::{StoreClient, StoreServer};
pub use tcp::tcp_world;
pub use zero::{FlatLayout, GradSync, Segment};
