//! One loop per task, each reading top to bottom: batches → engine step → log / eval / save.
//! Setup is the session's; the step is the engine's.

pub mod lm;
