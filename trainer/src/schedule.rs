//! Learning-rate schedules: linear warmup, then cosine, linear or constant down to `min_lr`.

use crate::recipe::schema::{ScheduleKind, ScheduleSection};

/// The learning rate of optimizer step `t` (0-based) of `total`.
pub fn learning_rate(peak: f64, s: &ScheduleSection, t: u64, total: u64) -> f64 {
    if t < s.warmup_steps {
        return peak * (t + 1) as f64 / s.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(s.warmup_steps).max(1);
    let progress = ((t - s.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match s.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Linear => s.min_lr + (peak - s.min_lr) * (1.0 - progress),
        ScheduleKind::Cosine => {
            s.min_lr + (peak - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(kind: ScheduleKind, warmup: u64) -> ScheduleSection {
        ScheduleSection {
            kind,
            warmup_steps: warmup,
            min_lr: 0.1,
        }
    }

    #[test]
    fn warmup_rises_linearly_then_cosine_reaches_min() {
        let s = section(ScheduleKind::Cosine, 4);
        assert_eq!(learning_rate(1.0, &s, 0, 14), 0.25);
        assert_eq!(learning_rate(1.0, &s, 3, 14), 1.0);
        assert_eq!(learning_rate(1.0, &s, 4, 14), 1.0);
        assert!((learning_rate(1.0, &s, 9, 14) - 0.55).abs() < 1e-12);
        assert!((learning_rate(1.0, &s, 14, 14) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn linear_and_constant() {
        let s = section(ScheduleKind::Linear, 0);
        assert!((learning_rate(1.0, &s, 5, 10) - 0.55).abs() < 1e-12);
        let s = section(ScheduleKind::Constant, 2);
        assert_eq!(learning_rate(2.0, &s, 7, 10), 2.0);
        assert_eq!(learning_rate(2.0, &s, 0, 10), 1.0);
    }
}
