//! Console progress: an indicatif bar on a terminal, else a plain stderr line every
//! `max(1, total / 20)` steps.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::StepMetrics;

const TEMPLATE: &str = "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]";

/// Shows training progress on stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    every: u64,
    start: Instant,
    start_step: u64,
}

impl Progress {
    /// A bar when `want_bar` and stderr is a terminal, else plain lines.
    pub fn new(want_bar: bool, total: u64, resume_step: u64) -> Self {
        let bar = (want_bar && std::io::stderr().is_terminal()).then(|| {
            let style = ProgressStyle::with_template(TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_position(resume_step);
            bar.reset_eta();
            bar
        });
        Progress {
            bar,
            total,
            every: (total / 20).max(1),
            start: Instant::now(),
            start_step: resume_step,
        }
    }

    pub fn step(&self, m: &StepMetrics) {
        let summary = format!(
            "loss {:.4} lr {:.3e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_message(summary);
                bar.set_position(m.step);
            }
            // checked_rem rather than is_multiple_of (Rust 1.87): the workspace targets 1.85.
            None if m.step.checked_rem(self.every) == Some(0) || m.step == self.total => {
                eprintln!(
                    "step {}/{} {summary} grad_norm {:.3} eta {}",
                    m.step,
                    self.total,
                    m.grad_norm,
                    fmt_duration(self.eta(m.step))
                );
            }
            None => {}
        }
    }

    /// Remaining time, extrapolated from the steps done since this run started.
    fn eta(&self, step: u64) -> Duration {
        let done = step.saturating_sub(self.start_step);
        let left = self.total.saturating_sub(step);
        if done == 0 {
            return Duration::ZERO;
        }
        self.start.elapsed().mul_f64(left as f64 / done as f64)
    }

    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// `1h02m03s`, `2m03s` or `3s`.
fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_duration;
    use std::time::Duration;

    #[test]
    fn formats_durations() {
        assert_eq!(fmt_duration(Duration::from_secs(3)), "3s");
        assert_eq!(fmt_duration(Duration::from_secs(123)), "2m03s");
        assert_eq!(fmt_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
