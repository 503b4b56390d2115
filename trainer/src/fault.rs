//! A test hook: `MOERU_FAULT=kill:RANK:STEP` or `stall:RANK:STEP` makes one rank fail.

use std::time::Duration;

/// A test hook: make one rank misbehave at one step (`MOERU_FAULT`, see `Fault::parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    /// 1-based step about to run when the fault fires.
    pub step: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The process kills itself with SIGKILL.
    Kill,
    /// The rank stops participating (sleeps forever).
    Stall,
}

impl Fault {
    /// `kill:RANK:STEP` or `stall:RANK:STEP`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let bad = || format!("MOERU_FAULT={text:?}: expected kill:RANK:STEP or stall:RANK:STEP");
        let [kind, rank, step] = parts.as_slice() else {
            return Err(bad());
        };
        let kind = match *kind {
            "kill" => FaultKind::Kill,
            "stall" => FaultKind::Stall,
            _ => return Err(bad()),
        };
        Ok(Self {
            kind,
            rank: rank.parse().map_err(|_| bad())?,
            step: step.parse().map_err(|_| bad())?,
        })
    }

    pub(crate) fn fire(&self) {
        match self.kind {
            FaultKind::Kill => {
                eprintln!(
                    "fault injection: rank {} kills itself at step {}",
                    self.rank, self.step
                );
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(3600));
            }
            FaultKind::Stall => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
}
