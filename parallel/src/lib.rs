//! Communicators, device mesh and sharded layers: arrives with issue #5 (distributed runtime).
