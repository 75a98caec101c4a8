//! Weighers: each gives every candidate node a raw value (higher is
//! better); the pipeline normalizes each weigher's values to `0..=1` over
//! the candidates (min-max, as Nova's `normalize`), multiplies by the
//! weigher's multiplier and sums. One file per weigher.

mod capacity;
mod load;
mod soft_affinity;
mod zone;

use std::fmt;

use crate::filter::Ctx;
use crate::model::Strategy;
use crate::state::{NodeMarks, RAW_LOAD};

pub(crate) use capacity::{CapacityWeigher, Resource};
pub(crate) use load::LoadWeigher;
pub(crate) use soft_affinity::SoftAffinityWeigher;
pub(crate) use zone::ZoneWeigher;

/// A weigher over candidate nodes.
pub(crate) trait Weigher: fmt::Debug + Send + Sync {
    /// Short name used in explanations.
    fn name(&self) -> &'static str;

    /// The multiplier for this demand; zero skips the weigher.
    fn multiplier(&self, ctx: &Ctx<'_>) -> f64;

    /// Whether the weigher has anything to say for this demand.
    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        let _ = ctx;
        true
    }

    /// Prepares per-node marks once per decision.
    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        let _ = (ctx, marks);
    }

    /// The raw value of one node (higher is better), after
    /// [`prepare`](Self::prepare).
    fn raw(&self, ctx: &Ctx<'_>, marks: &NodeMarks, node: u32) -> f64;

    /// Pushes one raw value per candidate onto `out` (the pipeline fuses
    /// this into its loop; tests use it to check one weigher).
    #[cfg(test)]
    fn weigh(&self, ctx: &Ctx<'_>, candidates: &[u32], marks: &mut NodeMarks, out: &mut Vec<f64>) {
        self.prepare(ctx, marks);
        out.extend(candidates.iter().map(|&c| self.raw(ctx, marks, c)));
    }
}

/// Every weigher, as one enum for static dispatch in the per-node loop.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AnyWeigher {
    Capacity(CapacityWeigher),
    Load(LoadWeigher),
    SoftAffinity(SoftAffinityWeigher),
    Zone(ZoneWeigher),
}

macro_rules! each_weigher {
    ($self:ident, $w:ident => $e:expr) => {
        match $self {
            AnyWeigher::Capacity($w) => $e,
            AnyWeigher::Load($w) => $e,
            AnyWeigher::SoftAffinity($w) => $e,
            AnyWeigher::Zone($w) => $e,
        }
    };
}

impl AnyWeigher {
    /// For the weighers whose raw value the state keeps per node, its slot
    /// in [`Hot::raw`](crate::state::Hot).
    pub(crate) fn core_slot(&self) -> Option<usize> {
        match self {
            AnyWeigher::Capacity(w) => Some(w.slot()),
            AnyWeigher::Load(_) => Some(RAW_LOAD),
            AnyWeigher::SoftAffinity(_) | AnyWeigher::Zone(_) => None,
        }
    }
}

impl Weigher for AnyWeigher {
    fn name(&self) -> &'static str {
        each_weigher!(self, w => w.name())
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        each_weigher!(self, w => w.multiplier(ctx))
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        each_weigher!(self, w => w.applies(ctx))
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        each_weigher!(self, w => w.prepare(ctx, marks))
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, marks: &NodeMarks, node: u32) -> f64 {
        each_weigher!(self, w => w.raw(ctx, marks, node))
    }
}

/// +1 when spreading, -1 when packing (Nova's negative multipliers).
pub(crate) fn spread_sign(strategy: Strategy) -> f64 {
    match strategy {
        Strategy::Spread => 1.0,
        Strategy::Pack => -1.0,
    }
}

/// A core weigher's raw value of a node, from the fast-path view (so the
/// fast and the explaining pipelines read the very same number).
#[inline]
pub(crate) fn core_raw(ctx: &Ctx<'_>, slot: usize, node: u32) -> f64 {
    f64::from(ctx.state.hot[node as usize].raw[slot])
}

/// The weighers in the order their scores are reported.
pub(crate) fn default_weighers() -> Vec<AnyWeigher> {
    vec![
        AnyWeigher::Capacity(CapacityWeigher(Resource::Ram)),
        AnyWeigher::Capacity(CapacityWeigher(Resource::Cpu)),
        AnyWeigher::Capacity(CapacityWeigher(Resource::Disk)),
        AnyWeigher::Load(LoadWeigher),
        AnyWeigher::SoftAffinity(SoftAffinityWeigher),
        AnyWeigher::Zone(ZoneWeigher),
    ]
}
