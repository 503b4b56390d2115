//! A test hook: `MOERU_FAULT=KIND:RANK:STEP[:POINT]` makes one rank fail at one point of one
//! step: `kill` (SIGKILL) or `stall` (stop calling collectives), at the step's start (default),
//! in forward, in backward, inside the gradient collective, while checkpoint files are being
//! written, or between the checkpoint's rename and `latest`.
//!
//! Owns: parsing the hook and firing it. Must not: decide where the points sit (the loop, the
//! engine and the checkpoint writer call [`Fault::at`] where they are).

use std::time::Duration;

/// A test hook: make one rank misbehave at one point of one step (see `Fault::parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub rank: usize,
    /// 1-based step during which the fault fires.
    pub step: u64,
    pub point: FaultPoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The process kills itself with SIGKILL.
    Kill,
    /// The rank stops participating (sleeps forever).
    Stall,
}

/// Where in the step the fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Before the step's first micro-batch.
    Start,
    /// In the forward pass of the step's last micro-batch (after its first ones ran).
    Forward,
    /// Before the backward pass of the step's last micro-batch.
    Backward,
    /// Before this rank enters the gradient sync, which its peers are already inside.
    Collective,
    /// After this rank wrote the first file of the step's checkpoint, before the rest.
    SaveWrite,
    /// Rank 0 only: after the checkpoint folder's rename, before `latest` points at it.
    SaveCommit,
}

impl FaultPoint {
    pub const ALL: [(&'static str, FaultPoint); 6] = [
        ("start", FaultPoint::Start),
        ("forward", FaultPoint::Forward),
        ("backward", FaultPoint::Backward),
        ("collective", FaultPoint::Collective),
        ("save-write", FaultPoint::SaveWrite),
        ("save-commit", FaultPoint::SaveCommit),
    ];
}

impl Fault {
    /// `kill:RANK:STEP[:POINT]` or `stall:RANK:STEP[:POINT]`, POINT one of start (default),
    /// forward, backward, collective, save-write, save-commit.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let points: Vec<&str> = FaultPoint::ALL.iter().map(|(n, _)| *n).collect();
        let bad = || {
            format!(
                "MOERU_FAULT={text:?}: expected kill:RANK:STEP[:POINT] or stall:RANK:STEP[:POINT], POINT one of {}",
                points.join(", ")
            )
        };
        let (kind, rank, step, point) = match parts.as_slice() {
            [k, r, s] => (*k, *r, *s, "start"),
            [k, r, s, p] => (*k, *r, *s, *p),
            _ => return Err(bad()),
        };
        let kind = match kind {
            "kill" => FaultKind::Kill,
            "stall" => FaultKind::Stall,
            _ => return Err(bad()),
        };
        let point = FaultPoint::ALL
            .iter()
            .find(|(n, _)| *n == point)
            .ok_or_else(bad)?
            .1;
        Ok(Self {
            kind,
            rank: rank.parse().map_err(|_| bad())?,
            step: step.parse().map_err(|_| bad())?,
            point,
        })
    }

    /// The fault, if it fires on world rank `rank` during 1-based step `step`.
    pub fn armed(fault: Option<Fault>, rank: usize, step: u64) -> Option<Fault> {
        fault.filter(|f| f.rank == rank && f.step == step)
    }

    /// Fires `fault` if it is armed for `point`.
    pub fn at(fault: Option<&Fault>, point: FaultPoint) {
        if let Some(f) = fault.filter(|f| f.point == point) {
            f.fire();
        }
    }

    fn fire(&self) {
        let name = FaultPoint::ALL
            .iter()
            .find(|(_, p)| *p == self.point)
            .map_or("?", |(n, _)| *n);
        match self.kind {
            FaultKind::Kill => {
                eprintln!(
                    "fault injection: rank {} kills itself at step {} ({name})",
                    self.rank, self.step
                );
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(3600));
            }
            FaultKind::Stall => {
                eprintln!(
                    "fault injection: rank {} stalls at step {} ({name})",
                    self.rank, self.step
                );
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_point_and_names_them_on_error() {
        let f = Fault::parse("kill:1:6").unwrap();
        assert_eq!(
            (f.kind, f.rank, f.step, f.point),
            (FaultKind::Kill, 1, 6, FaultPoint::Start)
        );
        for (name, point) in FaultPoint::ALL {
            let f = Fault::parse(&format!("stall:0:3:{name}")).unwrap();
            assert_eq!((f.kind, f.point), (FaultKind::Stall, point));
        }
        let e = Fault::parse("kill:1:6:sideways").unwrap_err();
        assert!(e.contains("save-commit") && e.contains("sideways"), "{e}");
        assert!(Fault::parse("kill:x:6").is_err());
    }
}
