//! `MetricsSink`: the one object the training loop logs through.

use std::fs;
use std::path::Path;

use super::jsonl::JsonlWriter;
use super::progress::Progress;
use super::record::{eval_json, eval_values_json};
use super::tfevents::EventWriter;
use super::{MetricsError, StepMetrics};

/// Writes `metrics.jsonl`, optional TensorBoard events, and console progress.
pub struct MetricsSink {
    jsonl: JsonlWriter,
    events: Option<EventWriter>,
    progress: Progress,
}

impl MetricsSink {
    /// Opens `dir` (created if missing). `metrics.jsonl` in it is kept up to `resume_step`:
    /// lines with step > resume_step are dropped (rewritten atomically: temp file + rename),
    /// so a resumed run's file has every step exactly once. `resume_step = 0` for a fresh run
    /// (then an existing metrics.jsonl is truncated). TensorBoard events go to a new
    /// `events.out.tfevents.<unix-secs>.<hostname>.<pid>.<counter>` file in `dir` when
    /// `tensorboard`; a resumed run's file starts with a `SessionLog START` at
    /// `resume_step + 1`, which makes TensorBoard drop the older files' events past `resume_step`.
    /// A progress bar shows step/total, loss, lr, tokens/s and ETA when `progress` and stderr
    /// is a terminal; otherwise a plain line goes to stderr every `max(1, total/20)` steps.
    pub fn open(
        dir: &Path,
        tensorboard: bool,
        progress: bool,
        total_steps: u64,
        resume_step: u64,
    ) -> Result<Self, MetricsError> {
        fs::create_dir_all(dir).map_err(|e| MetricsError::io("create directory", dir, e))?;
        let jsonl = JsonlWriter::open(dir, resume_step)?;
        let events = if tensorboard {
            Some(EventWriter::create(dir, resume_step)?)
        } else {
            None
        };
        Ok(MetricsSink {
            jsonl,
            events,
            progress: Progress::new(progress, total_steps, resume_step),
        })
    }

    /// Path of this run's TensorBoard event file, when enabled.
    pub fn event_file(&self) -> Option<&Path> {
        self.events.as_ref().map(EventWriter::path)
    }

    /// Logs one optimizer step to every output and flushes the files.
    pub fn log_step(&mut self, m: &StepMetrics) -> Result<(), MetricsError> {
        self.jsonl.write(&m.to_json())?;
        if let Some(events) = &mut self.events {
            events.write_scalars(m.step, &m.scalars())?;
            events.flush()?;
        }
        self.progress.step(m);
        Ok(())
    }

    /// Evaluation result at `step`: writes {"step", "eval_loss", "eval_ppl"} to metrics.jsonl
    /// and TensorBoard (tags eval/loss, eval/ppl), and prints it.
    pub fn log_eval(&mut self, step: u64, loss: f64) -> Result<(), MetricsError> {
        let ppl = loss.exp();
        self.jsonl.write(&eval_json(step, loss))?;
        if let Some(events) = &mut self.events {
            let scalars = [
                ("eval/loss".to_string(), loss as f32),
                ("eval/ppl".to_string(), ppl as f32),
            ];
            events.write_scalars(step, &scalars)?;
            events.flush()?;
        }
        self.progress
            .println(&format!("eval step {step}: loss {loss:.4} ppl {ppl:.3}"));
        Ok(())
    }

    /// A task's evaluation values at `step` (DPO: loss and rewards on held-out pairs):
    /// metrics.jsonl keys `eval_<name>`, TensorBoard tags `eval/<name>`, and one printed line.
    pub fn log_eval_values(
        &mut self,
        step: u64,
        values: &[(String, f64)],
    ) -> Result<(), MetricsError> {
        self.jsonl.write(&eval_values_json(step, values))?;
        if let Some(events) = &mut self.events {
            let scalars: Vec<(String, f32)> = values
                .iter()
                .map(|(n, v)| (format!("eval/{n}"), *v as f32))
                .collect();
            events.write_scalars(step, &scalars)?;
            events.flush()?;
        }
        let parts: Vec<String> = values.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
        self.progress
            .println(&format!("eval step {step}: {}", parts.join(" ")));
        Ok(())
    }

    /// Prints a line (through the progress bar when present, so it is not garbled).
    pub fn println(&self, line: &str) {
        self.progress.println(line);
    }

    /// Flushes files to disk and finishes the bar.
    pub fn finish(mut self) -> Result<(), MetricsError> {
        self.progress.finish();
        self.jsonl.sync()?;
        if let Some(events) = &mut self.events {
            events.sync()?;
        }
        Ok(())
    }
}
