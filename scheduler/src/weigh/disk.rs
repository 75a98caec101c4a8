//! Free disk (Nova's `DiskWeigher`): the free fraction of the node's
//! effective disk after its overcommit ratio. Spreading prefers more
//! free disk, packing less (the multiplier's sign flips).

use super::{Weigher, core_raw, spread_sign};
use crate::filter::Ctx;
use crate::state::{NodeMarks, RAW_DISK};

/// Weighs free disk.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiskWeigher;

impl Weigher for DiskWeigher {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        ctx.state.config.weights.disk * spread_sign(ctx.demand.strategy)
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        core_raw(ctx, RAW_DISK, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn free_disk_fraction_with_half_weight() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let mut out = Vec::new();
        DiskWeigher.weigh(&ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        assert_eq!(out, vec![f64::from(0.9f32), 1.0]);
        assert_eq!(DiskWeigher.multiplier(&ctx), 0.5);
    }
}
