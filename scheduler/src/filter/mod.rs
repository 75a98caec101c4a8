//! Filters: each removes the nodes that cannot take a demand (a new
//! instance, or an instance that would move), and says why in a sentence
//! when asked. One file per filter; names follow Nova's filters.
//!
//! The pipeline prepares each applicable filter once per decision
//! ([`Filter::prepare`]: marks from the label and group indexes), then runs
//! one loop over the nodes in which every filter checks the node in turn
//! ([`Filter::check_prepared`], dispatched statically through
//! [`AnyFilter`]); the first rejection is counted under a [`Reason`].
//! Sentences ([`Filter::explain`]) are only built when the caller asked for
//! a full explanation or a single node's verdicts.

mod affinity;
mod anti_affinity;
mod headroom;
mod instance_limit;
mod labels;
mod node_state;
mod resources;
mod zone;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Demand, NodeMarks};

pub(crate) use affinity::AffinityFilter;
pub(crate) use anti_affinity::AntiAffinityFilter;
pub(crate) use headroom::HeadroomFilter;
pub(crate) use instance_limit::InstanceLimitFilter;
pub(crate) use labels::LabelFilter;
pub(crate) use node_state::NodeStateFilter;
pub(crate) use resources::ResourceFilter;
pub(crate) use zone::ZoneFilter;

/// Why a filter rejected a node; the unit of "no valid host" counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The node is down.
    NodeDown,
    /// The node is draining.
    NodeDraining,
    /// The node is disabled.
    NodeDisabled,
    /// The node is powered down (standby).
    NodeStandby,
    /// The instance already runs on the node.
    CurrentNode,
    /// The node is not in the required zone.
    ZoneMismatch,
    /// The node lacks a required label.
    LabelMissing,
    /// Not enough free vCPUs after the overcommit ratio.
    VcpusExhausted,
    /// Not enough free memory after the overcommit ratio.
    MemoryExhausted,
    /// Not enough free disk after the overcommit ratio.
    DiskExhausted,
    /// The node runs as many instances as it may.
    InstanceLimit,
    /// Hard affinity: the group's members run elsewhere.
    Affinity,
    /// Hard anti-affinity: the node already runs enough members.
    AntiAffinity,
    /// The move would push the node over the consolidation headroom.
    Headroom,
}

impl Reason {
    /// Every reason, in counting order.
    pub const ALL: [Reason; 14] = [
        Reason::NodeDown,
        Reason::NodeDraining,
        Reason::NodeDisabled,
        Reason::NodeStandby,
        Reason::CurrentNode,
        Reason::ZoneMismatch,
        Reason::LabelMissing,
        Reason::VcpusExhausted,
        Reason::MemoryExhausted,
        Reason::DiskExhausted,
        Reason::InstanceLimit,
        Reason::Affinity,
        Reason::AntiAffinity,
        Reason::Headroom,
    ];

    /// The phrase used in counts: "memory exhausted" (on 3 nodes).
    pub fn summary(self) -> &'static str {
        match self {
            Reason::NodeDown => "node down",
            Reason::NodeDraining => "node draining",
            Reason::NodeDisabled => "node disabled",
            Reason::NodeStandby => "node in standby",
            Reason::CurrentNode => "instance already there",
            Reason::ZoneMismatch => "zone not matched",
            Reason::LabelMissing => "labels not matched",
            Reason::VcpusExhausted => "vcpus exhausted",
            Reason::MemoryExhausted => "memory exhausted",
            Reason::DiskExhausted => "disk exhausted",
            Reason::InstanceLimit => "instance limit reached",
            Reason::Affinity => "affinity group elsewhere",
            Reason::AntiAffinity => "anti-affinity group member present",
            Reason::Headroom => "headroom exceeded",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.summary())
    }
}

/// What the filters see: the state and the demand being placed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub state: &'a ClusterState,
    pub demand: &'a Demand,
}

/// Counts rejections per reason, and in full-explain mode remembers each
/// rejected node with the filter that rejected it.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    pub counts: [u32; Reason::ALL.len()],
    pub filter: u8,
    pub nodes: Option<Vec<(u32, u8)>>,
}

impl Rejections {
    /// Starts over; `explain` keeps the rejected nodes.
    pub fn reset(&mut self, explain: bool) {
        self.counts = [0; Reason::ALL.len()];
        self.filter = 0;
        match (&mut self.nodes, explain) {
            (Some(nodes), true) => nodes.clear(),
            (nodes, true) => *nodes = Some(Vec::new()),
            (nodes, false) => *nodes = None,
        }
    }

    /// Records that `node` was rejected for `reason`.
    #[inline]
    pub fn reject(&mut self, node: u32, reason: Reason) {
        self.counts[reason as usize] += 1;
        if let Some(nodes) = &mut self.nodes {
            nodes.push((node, self.filter));
        }
    }

    /// Counts `n` rejections for `reason` without naming the nodes.
    pub fn reject_many(&mut self, n: u32, reason: Reason) {
        self.counts[reason as usize] += n;
    }
}

/// A filter over candidate nodes.
pub(crate) trait Filter: fmt::Debug + Send + Sync {
    /// Short name used in explanations ("memory", "anti-affinity").
    fn name(&self) -> &'static str;

    /// Whether this filter has anything to check for the demand.
    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        let _ = ctx;
        true
    }

    /// When the nodes this filter passes are exactly an indexed list (for
    /// the zone filter, the zone's nodes), that list and the reason for all
    /// others; the pipeline then starts from it instead of every node.
    fn seed<'s>(&self, ctx: &Ctx<'s>) -> Option<(&'s [u32], Reason)> {
        let _ = ctx;
        None
    }

    /// Checks one node on its own: `None` when it passes.
    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason>;

    /// A sentence saying why `check` rejects `node`.
    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String;

    /// Prepares per-node marks once per decision (from the label, zone or
    /// group indexes) so that [`check_prepared`](Self::check_prepared) is
    /// O(1) per node.
    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        let _ = (ctx, marks);
    }

    /// Same verdict as [`check`](Self::check), after
    /// [`prepare`](Self::prepare) filled `marks`.
    #[inline]
    fn check_prepared(&self, ctx: &Ctx<'_>, marks: &NodeMarks, node: u32) -> Option<Reason> {
        let _ = marks;
        self.check(ctx, node)
    }

    /// Removes the nodes this filter rejects, recording each rejection (the
    /// pipeline fuses this into one loop over all filters; tests use it to
    /// check one filter at a time).
    #[cfg(test)]
    fn retain(
        &self,
        ctx: &Ctx<'_>,
        candidates: &mut Vec<u32>,
        marks: &mut NodeMarks,
        sink: &mut Rejections,
    ) {
        self.prepare(ctx, marks);
        candidates.retain(|&node| match self.check_prepared(ctx, marks, node) {
            None => true,
            Some(reason) => {
                sink.reject(node, reason);
                false
            }
        });
    }
}

/// Every filter, as one enum so the pipeline's per-node loop dispatches
/// statically (a `match` the compiler inlines) instead of through a vtable.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AnyFilter {
    Zone(ZoneFilter),
    State(NodeStateFilter),
    Resources(ResourceFilter),
    Instances(InstanceLimitFilter),
    Labels(LabelFilter),
    AntiAffinity(AntiAffinityFilter),
    Affinity(AffinityFilter),
    Headroom(HeadroomFilter),
}

macro_rules! each_filter {
    ($self:ident, $f:ident => $e:expr) => {
        match $self {
            AnyFilter::Zone($f) => $e,
            AnyFilter::State($f) => $e,
            AnyFilter::Resources($f) => $e,
            AnyFilter::Instances($f) => $e,
            AnyFilter::Labels($f) => $e,
            AnyFilter::AntiAffinity($f) => $e,
            AnyFilter::Affinity($f) => $e,
            AnyFilter::Headroom($f) => $e,
        }
    };
}

impl AnyFilter {
    /// The filters the placement fast path evaluates from
    /// [`Hot`](crate::state::Hot): node state, resources, instance limit.
    /// They come right after the zone filter and before all others.
    pub(crate) fn is_core(&self) -> bool {
        matches!(
            self,
            AnyFilter::State(_) | AnyFilter::Resources(_) | AnyFilter::Instances(_)
        )
    }
}

impl Filter for AnyFilter {
    fn name(&self) -> &'static str {
        each_filter!(self, f => f.name())
    }

    fn applies(&self, ctx: &Ctx<'_>) -> bool {
        each_filter!(self, f => f.applies(ctx))
    }

    fn seed<'s>(&self, ctx: &Ctx<'s>) -> Option<(&'s [u32], Reason)> {
        each_filter!(self, f => f.seed(ctx))
    }

    fn check(&self, ctx: &Ctx<'_>, node: u32) -> Option<Reason> {
        each_filter!(self, f => f.check(ctx, node))
    }

    fn explain(&self, ctx: &Ctx<'_>, node: u32) -> String {
        each_filter!(self, f => f.explain(ctx, node))
    }

    fn prepare(&self, ctx: &Ctx<'_>, marks: &mut NodeMarks) {
        each_filter!(self, f => f.prepare(ctx, marks))
    }

    #[inline]
    fn check_prepared(&self, ctx: &Ctx<'_>, marks: &NodeMarks, node: u32) -> Option<Reason> {
        each_filter!(self, f => f.check_prepared(ctx, marks, node))
    }
}

/// The filters in evaluation order: cheap and selective first.
pub(crate) fn default_filters() -> Vec<AnyFilter> {
    vec![
        AnyFilter::Zone(ZoneFilter),
        AnyFilter::State(NodeStateFilter),
        AnyFilter::Resources(ResourceFilter),
        AnyFilter::Instances(InstanceLimitFilter),
        AnyFilter::Labels(LabelFilter),
        AnyFilter::AntiAffinity(AntiAffinityFilter),
        AnyFilter::Affinity(AffinityFilter),
        AnyFilter::Headroom(HeadroomFilter),
    ]
}

/// Up to three node names, for sentences.
pub(crate) fn name_nodes(state: &ClusterState, nodes: &[u32]) -> String {
    let mut names: Vec<&str> = nodes.iter().take(3).map(|&n| state.node_name(n)).collect();
    if nodes.len() > 3 {
        names.push("...");
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_filters_follow_the_zone_filter_and_precede_the_others() {
        // The fast path counts rejections in this order; the explaining
        // path runs the list as is.
        let core: Vec<bool> = default_filters().iter().map(AnyFilter::is_core).collect();
        assert!(matches!(default_filters()[0], AnyFilter::Zone(_)));
        assert_eq!(
            core,
            vec![false, true, true, true, false, false, false, false]
        );
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A small cluster and helpers shared by the filter and weigher tests.

    use crate::model::{ClusterSnapshot, GroupPolicy, PlacementRequest, Resources, ServerGroup};
    use crate::place::Scheduler;
    use crate::state::Demand;
    use crate::testing::{instance, node};

    /// Three nodes: a (z1, 8 vCPU, 8 GiB, ssd), b (z1), c (z2, down); i1 on a.
    pub fn snapshot() -> ClusterSnapshot {
        let mut a = node("a", "z1", 8, 8192, 100);
        a.labels.insert("disk".into(), "ssd".into());
        let mut c = node("c", "z2", 8, 8192, 100);
        c.state = crate::model::NodeState::Down;
        let mut i1 = instance("i1", "a", 2, 6144, 10);
        i1.groups = vec!["anti".into(), "aff".into()];
        ClusterSnapshot {
            nodes: vec![a, node("b", "z1", 8, 8192, 100), c],
            instances: vec![i1],
            groups: vec![
                ServerGroup {
                    id: "anti".into(),
                    policy: GroupPolicy::AntiAffinity,
                    max_per_node: None,
                },
                ServerGroup {
                    id: "aff".into(),
                    policy: GroupPolicy::Affinity,
                    max_per_node: None,
                },
                ServerGroup {
                    id: "soft".into(),
                    policy: GroupPolicy::SoftAntiAffinity,
                    max_per_node: None,
                },
            ],
            ..ClusterSnapshot::default()
        }
    }

    pub fn scheduler() -> Scheduler {
        Scheduler::new(&snapshot()).unwrap()
    }

    pub fn demand(s: &Scheduler, edit: impl FnOnce(&mut PlacementRequest)) -> Demand {
        let mut req = PlacementRequest::new("r", Resources::new(1, 1024, 10));
        edit(&mut req);
        s.demand_for(&req).unwrap()
    }
}
