//! The device mesh: world ranks laid out as pp × dp × tp (tp fastest, as Megatron), with the
//! expert-parallel groups folded over the dp × tp ranks of each pipeline stage, apart from the
//! tensor groups (Megatron's "parallel folding"): an EP group is `ep` consecutive ranks of a
//! stage, and the expert-data-parallel group joins the ranks holding the same experts.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::group::ProcessGroup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshSizes {
    pub dp: usize,
    pub pp: usize,
    pub tp: usize,
    pub ep: usize,
}

/// A rank's coordinates in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub pp: usize,
    pub dp: usize,
    pub tp: usize,
    /// Index within the EP group and which EP group of the stage.
    pub ep: usize,
    pub edp: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMesh {
    pub sizes: MeshSizes,
}

impl DeviceMesh {
    /// Checks that the sizes fit `world_size` ranks; the message carries the numbers.
    pub fn new(sizes: MeshSizes, world_size: usize) -> Result<Self, String> {
        let MeshSizes { dp, pp, tp, ep } = sizes;
        if [dp, pp, tp, ep].contains(&0) {
            return Err(format!(
                "`parallel` sizes must be at least 1 (dp {dp}, pp {pp}, tp {tp}, ep {ep})"
            ));
        }
        if dp * pp * tp != world_size {
            return Err(format!(
                "`parallel`: dp {dp} × pp {pp} × tp {tp} = {} ranks, but the job has {world_size}; make the product equal the number of ranks (ep is folded into dp × tp and does not count)",
                dp * pp * tp
            ));
        }
        if !(dp * tp).is_multiple_of(ep) {
            return Err(format!(
                "`parallel.ep` = {ep} must divide dp × tp = {} (the ranks of a pipeline stage)",
                dp * tp
            ));
        }
        Ok(Self { sizes })
    }

    pub fn world_size(&self) -> usize {
        self.sizes.dp * self.sizes.pp * self.sizes.tp
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let MeshSizes { dp, tp, ep, .. } = self.sizes;
        let stage_rank = rank % (dp * tp);
        Coords {
            pp: rank / (dp * tp),
            dp: stage_rank / tp,
            tp: rank % tp,
            ep: stage_rank % ep,
            edp: stage_rank / ep,
        }
    }

    /// The world rank at `pp`, `dp`, `tp`.
    pub fn rank_of(&self, pp: usize, dp: usize, tp: usize) -> usize {
        (pp * self.sizes.dp + dp) * self.sizes.tp + tp
    }

    /// Members (world ranks, in order) of each kind of group that `rank` belongs to.
    pub fn members(&self, rank: usize, kind: GroupKind) -> Vec<usize> {
        let c = self.coords(rank);
        let MeshSizes { dp, pp, tp, ep } = self.sizes;
        let stage = c.pp * dp * tp;
        match kind {
            GroupKind::Dp => (0..dp).map(|d| self.rank_of(c.pp, d, c.tp)).collect(),
            GroupKind::Tp => (0..tp).map(|t| self.rank_of(c.pp, c.dp, t)).collect(),
            GroupKind::Pp => (0..pp).map(|p| self.rank_of(p, c.dp, c.tp)).collect(),
            GroupKind::Ep => (0..ep).map(|e| stage + c.edp * ep + e).collect(),
            GroupKind::Edp => (0..dp * tp / ep).map(|g| stage + g * ep + c.ep).collect(),
        }
    }

    /// Splits `world` into this rank's groups. Collective: every rank calls it.
    pub fn groups(&self, world: &ProcessGroup) -> Result<MeshGroups> {
        let rank = world.info().world_rank();
        // The color of a group is its smallest member, which every member computes alike.
        let split = |kind: GroupKind| world.split(self.members(rank, kind)[0] as u32, kind.name());
        let split = |kind| split(kind).map(Arc::new);
        Ok(MeshGroups {
            dp: split(GroupKind::Dp)?,
            tp: split(GroupKind::Tp)?,
            pp: split(GroupKind::Pp)?,
            ep: split(GroupKind::Ep)?,
            edp: split(GroupKind::Edp)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Dp,
    Tp,
    Pp,
    Ep,
    Edp,
}

impl GroupKind {
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Dp => "dp",
            GroupKind::Tp => "tp",
            GroupKind::Pp => "pp",
            GroupKind::Ep => "ep",
            GroupKind::Edp => "edp",
        }
    }
}

/// This rank's process groups, passed explicitly to whatever needs them (shared: the
/// model's differentiable collectives hold the tensor- and expert-parallel ones).
pub struct MeshGroups {
    pub dp: Arc<ProcessGroup>,
    pub tp: Arc<ProcessGroup>,
    pub pp: Arc<ProcessGroup>,
    pub ep: Arc<ProcessGroup>,
    pub edp: Arc<ProcessGroup>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(dp: usize, pp: usize, tp: usize, ep: usize) -> Result<DeviceMesh, String> {
        DeviceMesh::new(MeshSizes { dp, pp, tp, ep }, dp * pp * tp)
    }

    #[test]
    fn groups_partition_the_world() {
        let m = mesh(4, 2, 2, 4).unwrap();
        let w = m.world_size();
        for kind in [
            GroupKind::Dp,
            GroupKind::Tp,
            GroupKind::Pp,
            GroupKind::Ep,
            GroupKind::Edp,
        ] {
            let mut seen = vec![0; w];
            for (r, s) in seen.iter_mut().enumerate() {
                let g = m.members(r, kind);
                assert!(g.contains(&r), "{kind:?} group of {r}: {g:?}");
                for &x in &g {
                    assert_eq!(m.members(x, kind), g, "{kind:?} groups must agree");
                }
                *s += 1;
            }
            assert!(seen.iter().all(|&s| s == 1));
        }
        // tp is fastest: ranks 0 and 1 share a TP group; EP groups cut across TP (folding).
        assert_eq!(m.members(0, GroupKind::Tp), vec![0, 1]);
        assert_eq!(m.members(0, GroupKind::Dp), vec![0, 2, 4, 6]);
        assert_eq!(m.members(0, GroupKind::Pp), vec![0, 8]);
        assert_eq!(m.members(9, GroupKind::Ep), vec![8, 9, 10, 11]);
        assert_eq!(m.members(9, GroupKind::Edp), vec![9, 13]);
    }

    #[test]
    fn bad_sizes_name_the_numbers() {
        let e = DeviceMesh::new(
            MeshSizes {
                dp: 3,
                pp: 1,
                tp: 1,
                ep: 1,
            },
            4,
        )
        .unwrap_err();
        assert!(e.contains("= 3 ranks") && e.contains("has 4"), "{e}");
        let e = mesh(2, 1, 1, 4).unwrap_err();
        assert!(e.contains("`parallel.ep` = 4") && e.contains("= 2"), "{e}");
        let e = mesh(0, 1, 1, 1).unwrap_err();
        assert!(e.contains("dp 0"), "{e}");
    }
}
