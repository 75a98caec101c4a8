//! Free vCPUs, memory and disk after the node's overcommit ratios (Nova's
//! `CoreFilter`, `RamFilter` and `DiskFilter` in one pass; the reason names
//! the first exhausted dimension, like Nomad's "Dimension memory exhausted").

use super::{Ctx, Filter, Reason};
use crate::state::{DISK, MEM, VCPU, res_array};

/// Rejects nodes without room for the demand.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ResourceFilter;

const REASONS: [Reason; 3] = [
    Reason::VcpusExhausted,
    Reason::MemoryExhausted,
    Reason::DiskExhausted,
];

impl Filter for ResourceFilter {
    fn name(&self) -> &'static str {
        "resources"
    }

    #[inline]
    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        let n = &ctx.state.nodes[node as usize];
        let need = res_array(&ctx.demand.res);
        (0..3).find(|&d| !n.fits(d, need[d])).map(|d| REASONS[d])
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        let n = &ctx.state.nodes[node as usize];
        let ratios = ctx.state.meta[node as usize].ratios;
        let need = res_array(&ctx.demand.res);
        let free = |d: usize| n.free(d).max(0.0).floor();
        match (0..3).find(|&d| !n.fits(d, need[d])) {
            Some(VCPU) => format!(
                "vcpus: needs {}, {} free after ratio {}",
                need[VCPU],
                free(VCPU),
                ratios[VCPU]
            ),
            Some(MEM) => format!(
                "memory: needs {} MiB, {} MiB free after ratio {}",
                need[MEM],
                free(MEM),
                ratios[MEM]
            ),
            Some(DISK) => format!(
                "disk: needs {} GiB, {} GiB free after ratio {}",
                need[DISK],
                free(DISK),
                ratios[DISK]
            ),
            _ => "resources: the node has room".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};
    use crate::model::Resources;

    #[test]
    fn memory_uses_the_ratio_and_explains() {
        let s = scheduler();
        // Node a: 8192 MiB x 1.5 = 12288, i1 holds 6144: 6144 free.
        let fits = demand(&s, |r| r.resources = Resources::new(1, 6144, 1));
        let ctx = Ctx {
            state: &s.state,
            demand: &fits,
        };
        assert_eq!(ResourceFilter.check(&ctx, 0), None);
        let big = demand(&s, |r| r.resources = Resources::new(1, 6145, 1));
        let ctx = Ctx {
            state: &s.state,
            demand: &big,
        };
        assert_eq!(ResourceFilter.check(&ctx, 0), Some(Reason::MemoryExhausted));
        assert_eq!(
            ResourceFilter.explain(&ctx, 0),
            "memory: needs 6145 MiB, 6144 MiB free after ratio 1.5"
        );
    }

    #[test]
    fn vcpus_and_disk() {
        let s = scheduler();
        // 8 vCPUs x 16 = 128, 2 used.
        let cpu = demand(&s, |r| r.resources = Resources::new(127, 1, 1));
        let ctx = Ctx {
            state: &s.state,
            demand: &cpu,
        };
        assert_eq!(ResourceFilter.check(&ctx, 0), Some(Reason::VcpusExhausted));
        assert_eq!(ResourceFilter.check(&ctx, 1), None);
        assert_eq!(
            ResourceFilter.explain(&ctx, 0),
            "vcpus: needs 127, 126 free after ratio 16"
        );
        let disk = demand(&s, |r| r.resources = Resources::new(1, 1, 91));
        let ctx = Ctx {
            state: &s.state,
            demand: &disk,
        };
        assert_eq!(ResourceFilter.check(&ctx, 0), Some(Reason::DiskExhausted));
        assert_eq!(ResourceFilter.check(&ctx, 1), None);
    }
}
