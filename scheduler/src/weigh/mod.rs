//! Weighers: each gives every candidate node a raw value (higher is
//! better); the pipeline normalizes each weigher's values to `0..=1` over
//! the candidates (min-max, as Nova's `normalize`), multiplies by the
//! weigher's multiplier and sums. One file per weigher.

mod cpu;
mod disk;
mod load;
mod ram;
mod soft_affinity;
mod zone;

use std::fmt;

use crate::filter::Ctx;
use crate::model::Strategy;
use crate::state::NodeMarks;

pub(crate) use cpu::CpuWeigher;
pub(crate) use disk::DiskWeigher;
pub(crate) use load::LoadWeigher;
pub(crate) use ram::RamWeigher;
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

    /// Pushes one raw value per candidate onto `out` (higher is better).
    fn weigh(&self, ctx: &Ctx<'_>, candidates: &[u32], marks: &mut NodeMarks, out: &mut Vec<f64>);
}

/// +1 when spreading, -1 when packing (Nova's negative multipliers).
pub(crate) fn spread_sign(strategy: Strategy) -> f64 {
    match strategy {
        Strategy::Spread => 1.0,
        Strategy::Pack => -1.0,
    }
}

/// Free fraction of dimension `d` of every candidate.
pub(crate) fn free_fraction(ctx: &Ctx<'_>, d: usize, candidates: &[u32], out: &mut Vec<f64>) {
    let nodes = &ctx.state.nodes;
    out.extend(candidates.iter().map(|&c| {
        let n = &nodes[c as usize];
        if n.cap[d] > 0.0 {
            n.free(d) / n.cap[d]
        } else {
            0.0
        }
    }));
}

/// The weighers in the order their scores are reported.
pub(crate) fn default_weighers() -> Vec<Box<dyn Weigher>> {
    vec![
        Box::new(RamWeigher),
        Box::new(CpuWeigher),
        Box::new(DiskWeigher),
        Box::new(LoadWeigher),
        Box::new(SoftAffinityWeigher),
        Box::new(ZoneWeigher),
    ]
}

/// Min-max normalization of one weigher's raw values: `(min, range)`;
/// a range of zero means the weigher does not separate the candidates.
pub(crate) fn min_range(raw: &[f64]) -> (f64, f64) {
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    for &v in raw {
        min = min.min(v);
        max = max.max(v);
    }
    if raw.is_empty() {
        (0.0, 0.0)
    } else {
        (min, max - min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_range() {
        assert_eq!(min_range(&[]), (0.0, 0.0));
        assert_eq!(min_range(&[3.0, 1.0, 2.0]), (1.0, 2.0));
        assert_eq!(min_range(&[5.0, 5.0]), (5.0, 0.0));
    }
}
