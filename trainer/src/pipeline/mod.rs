//! Pipeline parallelism: the stage split (which layers each virtual stage runs) and the
//! schedules (what each pipeline rank computes and exchanges in one step, as data). The
//! executor that runs a plan over stage models and point-to-point messages is issue #16's
//! next part; until then `parallel.pp` must be 1.

pub mod schedule;
pub mod stages;
