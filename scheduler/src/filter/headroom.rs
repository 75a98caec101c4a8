//! Consolidation headroom: a node that receives instances from a node being
//! emptied must stay under a CPU utilisation and memory ceiling, so that the
//! consolidated cluster still absorbs load spikes. Only applies to demands
//! that carry a headroom (consolidation moves).

use super::{Ctx, Filter, Reason};
use crate::state::MEM;

/// Rejects nodes that would end up above the headroom limits.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeadroomFilter;

impl Filter for HeadroomFilter {
    fn name(&self) -> &'static str {
        "headroom"
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        ctx.demand.headroom.is_some()
    }

    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        let h = ctx.demand.headroom?;
        let n = &ctx.state.nodes[node as usize];
        let cpu = n.cpu_util + n.util_delta(ctx.demand.cpu);
        let mem = (n.used[MEM].saturating_add(ctx.demand.res.memory_mib)) as f64;
        (cpu > h.max_cpu_util || mem > h.max_mem_fraction * n.cap[MEM]).then_some(Reason::Headroom)
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        let Some(h) = ctx.demand.headroom else {
            return "headroom: no limit applies".into();
        };
        let n = &ctx.state.nodes[node as usize];
        let cpu = n.cpu_util + n.util_delta(ctx.demand.cpu);
        let mem = (n.used[MEM].saturating_add(ctx.demand.res.memory_mib)) as f64;
        let mem_frac = if n.cap[MEM] > 0.0 {
            mem / n.cap[MEM]
        } else {
            f64::INFINITY
        };
        format!(
            "headroom: node would run at {:.0}% CPU (limit {:.0}%) and {:.0}% memory (limit {:.0}%)",
            cpu * 100.0,
            h.max_cpu_util * 100.0,
            mem_frac * 100.0,
            h.max_mem_fraction * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::scheduler;
    use crate::model::Strategy;
    use crate::state::Headroom;

    #[test]
    fn limits_memory_fraction() {
        let s = scheduler();
        let mut d = s.state.instance_demand(0, Strategy::Pack);
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(!HeadroomFilter.applies(&ctx));
        d.headroom = Some(Headroom {
            max_cpu_util: 0.9,
            max_mem_fraction: 0.4,
        });
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        // b: 6144 of 12288 MiB would be 50% > 40%.
        assert_eq!(HeadroomFilter.check(&ctx, 1), Some(Reason::Headroom));
        assert!(
            HeadroomFilter
                .explain(&ctx, 1)
                .contains("50% memory (limit 40%)")
        );
        d.headroom = Some(Headroom {
            max_cpu_util: 0.9,
            max_mem_fraction: 0.5,
        });
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert_eq!(HeadroomFilter.check(&ctx, 1), None);
    }
}
