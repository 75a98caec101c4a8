//! Free capacity (Nova's `RamWeigher`, `CpuWeigher` and `DiskWeigher`, one
//! weigher with the resource as its parameter): the free fraction of the
//! node's effective memory, vCPUs or disk after its overcommit ratio.
//! Spreading prefers more free capacity, packing less (the multiplier's sign
//! flips).

use super::{Weigher, core_raw, spread_sign};
use crate::filter::Ctx;
use crate::state::{NodeMarks, RAW_DISK, RAW_MEM, RAW_VCPU};

/// The resource a [`CapacityWeigher`] weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    Ram,
    Cpu,
    Disk,
}

/// Weighs the free fraction of one resource.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CapacityWeigher(pub(crate) Resource);

impl CapacityWeigher {
    /// The resource's slot in [`Hot::raw`](crate::state::Hot).
    pub(crate) fn slot(self) -> usize {
        match self.0 {
            Resource::Ram => RAW_MEM,
            Resource::Cpu => RAW_VCPU,
            Resource::Disk => RAW_DISK,
        }
    }
}

impl Weigher for CapacityWeigher {
    fn name(&self) -> &'static str {
        match self.0 {
            Resource::Ram => "ram",
            Resource::Cpu => "cpu",
            Resource::Disk => "disk",
        }
    }

    fn multiplier(&self, ctx: &Ctx<'_>) -> f64 {
        let weights = &ctx.state.config.weights;
        let weight = match self.0 {
            Resource::Ram => weights.ram,
            Resource::Cpu => weights.cpu,
            Resource::Disk => weights.disk,
        };
        weight * spread_sign(ctx.demand.strategy)
    }

    #[inline]
    fn raw(&self, ctx: &Ctx<'_>, _: &NodeMarks, node: u32) -> f64 {
        core_raw(ctx, self.slot(), node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};
    use crate::model::Strategy;

    fn weigh(w: CapacityWeigher, ctx: &Ctx<'_>) -> Vec<f64> {
        let mut out = Vec::new();
        w.weigh(ctx, &[0, 1], &mut NodeMarks::default(), &mut out);
        out
    }

    #[test]
    fn spread_prefers_free_memory_and_pack_flips_the_sign() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let ram = CapacityWeigher(Resource::Ram);
        assert_eq!(weigh(ram, &ctx), vec![0.5, 1.0]);
        assert_eq!(ram.multiplier(&ctx), 1.0);
        let d = demand(&s, |r| r.strategy = Some(Strategy::Pack));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(ram.multiplier(&ctx), -1.0);
    }

    #[test]
    fn free_vcpu_fraction() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(
            weigh(CapacityWeigher(Resource::Cpu), &ctx),
            vec![126.0 / 128.0, 1.0]
        );
    }

    #[test]
    fn free_disk_fraction_with_half_weight() {
        let s = scheduler();
        let d = demand(&s, |_| {});
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        let disk = CapacityWeigher(Resource::Disk);
        assert_eq!(weigh(disk, &ctx), vec![f64::from(0.9f32), 1.0]);
        assert_eq!(disk.multiplier(&ctx), 0.5);
    }

    #[test]
    fn each_resource_has_its_own_name_and_slot() {
        let all = [Resource::Ram, Resource::Cpu, Resource::Disk].map(CapacityWeigher);
        assert_eq!(all.map(|w| w.name()), ["ram", "cpu", "disk"]);
        assert_eq!(
            all.map(CapacityWeigher::slot),
            [RAW_MEM, RAW_VCPU, RAW_DISK]
        );
    }
}
