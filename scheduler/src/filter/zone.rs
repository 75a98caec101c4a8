//! Availability zone (Nova's `AvailabilityZoneFilter`). The pipeline starts
//! from the zone's node list instead of scanning every node.

use super::{Ctx, Filter, Reason};
use crate::state::ZoneReq;

/// Rejects nodes outside the required zone.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ZoneFilter;

impl Filter for ZoneFilter {
    fn name(&self) -> &'static str {
        "zone"
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        ctx.demand.zone != ZoneReq::Any
    }

    fn seed<'s>(&self, ctx: &Ctx<'s>) -> Option<(&'s [u32], Reason)> {
        match ctx.demand.zone {
            ZoneReq::Any => None,
            ZoneReq::Known(z) => Some((&ctx.state.zone_nodes[z as usize], Reason::ZoneMismatch)),
            ZoneReq::Unknown => Some((&[], Reason::ZoneMismatch)),
        }
    }

    #[inline]
    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        match ctx.demand.zone {
            ZoneReq::Any => None,
            ZoneReq::Known(z) if ctx.state.nodes[node as usize].zone == z => None,
            _ => Some(Reason::ZoneMismatch),
        }
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        let have = &ctx.state.zone_names[ctx.state.nodes[node as usize].zone as usize];
        match ctx.demand.zone {
            ZoneReq::Known(z) => format!(
                "zone: node is in zone {have:?}, zone {:?} is required",
                ctx.state.zone_names[z as usize]
            ),
            ZoneReq::Unknown => {
                let wanted = ctx
                    .demand
                    .unknown_names
                    .iter()
                    .find(|n| n.starts_with("zone"))
                    .map_or("the required zone", String::as_str);
                format!("zone: node is in zone {have:?}; no node is in {wanted}")
            }
            ZoneReq::Any => "zone: any zone will do".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{demand, scheduler};

    #[test]
    fn keeps_only_the_zone() {
        let s = scheduler();
        let d = demand(&s, |r| r.zone = Some("z2".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(ZoneFilter.applies(&ctx));
        assert_eq!(ZoneFilter.seed(&ctx).unwrap().0, &[2]);
        assert_eq!(ZoneFilter.check(&ctx, 0), Some(Reason::ZoneMismatch));
        assert_eq!(ZoneFilter.check(&ctx, 2), None);
        assert_eq!(
            ZoneFilter.explain(&ctx, 0),
            "zone: node is in zone \"z1\", zone \"z2\" is required"
        );
    }

    #[test]
    fn unknown_zone_matches_nothing_and_says_so() {
        let s = scheduler();
        let d = demand(&s, |r| r.zone = Some("mars".into()));
        let ctx = Ctx {
            state: &s.state,
            demand: &d,
        };
        assert!(ZoneFilter.seed(&ctx).unwrap().0.is_empty());
        assert_eq!(ZoneFilter.check(&ctx, 0), Some(Reason::ZoneMismatch));
        assert!(ZoneFilter.explain(&ctx, 0).contains("zone \"mars\""));
        let any = demand(&s, |_| {});
        assert!(!ZoneFilter.applies(&Ctx {
            state: &s.state,
            demand: &any
        }));
    }
}
