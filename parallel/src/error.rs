//! What a collective can fail with. Every message names the op, the group, this rank and the
//! ranks it waited for, so a hang in a many-rank job reads as one line per rank.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error(
        "{op} on group `{group}` timed out after {:.1}s on rank {rank}; group ranks {members:?}, still waiting for {missing:?}. A rank stopped participating (hung, crashed or out of step); raise `parallel.timeout_s` if it is only slow",
        timeout.as_secs_f64()
    )]
    Timeout {
        op: &'static str,
        group: String,
        rank: usize,
        members: Vec<usize>,
        missing: Vec<usize>,
        timeout: Duration,
    },
    #[error("{op} on group `{group}` failed on rank {rank}: rank {peer} is gone ({reason})")]
    PeerGone {
        op: &'static str,
        group: String,
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("{op} on group `{group}` on rank {rank}: the job was aborted ({reason})")]
    Aborted {
        op: &'static str,
        group: String,
        rank: usize,
        reason: String,
    },
    #[error("{op} on group `{group}` on rank {rank}: ranks are out of step: {detail}")]
    Mismatch {
        op: &'static str,
        group: String,
        rank: usize,
        detail: String,
    },
    #[error("{op} on group `{group}` on rank {rank}: {detail}")]
    BadArgument {
        op: &'static str,
        group: String,
        rank: usize,
        detail: String,
    },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("{backend}: {detail}")]
    Backend {
        backend: &'static str,
        detail: String,
    },
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;
