//! The placement pipeline: filters, then weighers, then select, over the
//! [`Scheduler`]'s indexed snapshot (Nomad's scheduler, Nova's
//! `FilterScheduler`).
//!
//! ```text
//! request ──► Demand ──► seed candidates (zone index, or every node)
//!                         │
//!                         ▼ each Filter::retain (counts rejections per Reason)
//!                      candidates ──► each Weigher: raw ─► min-max normalize ─► × multiplier ─► Σ
//!                                                                                   │
//!                                     highest total; ties by hash(request id, index, node id)
//! ```
//!
//! A batch places its instances one after another on the state updated by
//! the previous ones (no double booking), then undoes those updates: a plan
//! changes nothing until it is committed with
//! [`Scheduler::commit_placement`], which re-checks it first.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::check::{self, CheckPlanError};
use crate::filter::{AnyFilter, Ctx, Filter, Reason, Rejections, default_filters};
use crate::hash::{instance_seed, tie_key};
use crate::model::{ClusterSnapshot, PlacementRequest};
use crate::state::{
    BuildStateError, ClusterState, Demand, InstanceRt, NONE, NodeMarks, f32_up, ix,
};
use crate::weigh::{AnyWeigher, Weigher, default_weighers};

/// Most instances one batch may hold.
pub const MAX_BATCH: u32 = 10_000;

/// How much a decision explains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Explain {
    /// Counts per rejection reason and the chosen node's scores (cheap).
    #[default]
    Summary,
    /// Also a sentence for every rejected node.
    Full,
}

/// A placement decision for a request: one entry per instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementPlan {
    /// The request, kept so the plan can be re-checked on its own.
    pub request: PlacementRequest,
    /// Where each instance goes.
    pub placements: Vec<Placement>,
}

/// Where one instance goes, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Index of the instance in the request (`first_index + k`).
    pub index: u32,
    /// Id of the chosen node.
    pub node: String,
    /// The chosen node's total score.
    pub score: f64,
    /// The chosen node's score per weigher.
    pub scores: Vec<WeigherScore>,
    /// Nodes that passed every filter.
    pub candidates: u32,
    /// Nodes rejected, counted per reason.
    pub filtered: Vec<ReasonCount>,
    /// Each rejected node with its filter and reason ([`Explain::Full`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<NodeRejection>,
}

/// One weigher's contribution to a node's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeigherScore {
    /// The weigher.
    pub weigher: Cow<'static, str>,
    /// Its raw value for the node (free fraction, minus utilisation, ...).
    pub raw: f64,
    /// The raw value normalized over the candidates, `0..=1`.
    pub normalized: f64,
    /// The weigher's multiplier (negative when packing).
    pub multiplier: f64,
    /// `normalized * multiplier`, what the total adds up.
    pub weighted: f64,
}

/// A number of nodes rejected for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// The reason.
    pub reason: Reason,
    /// How many nodes.
    pub nodes: u32,
}

impl fmt::Display for ReasonCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.nodes == 1 { "" } else { "s" };
        write!(f, "{} on {} node{s}", self.reason, self.nodes)
    }
}

/// A rejected node, the filter that rejected it and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRejection {
    /// Node id.
    pub node: String,
    /// Filter name.
    pub filter: Cow<'static, str>,
    /// A sentence: "memory: needs 4096 MiB, 1024 MiB free after ratio 1.5".
    pub reason: String,
}

/// No node passed the filters for one instance of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoValidHost {
    /// The request.
    pub request_id: String,
    /// Index of the instance that found no node.
    pub index: u32,
    /// Instances of the batch placed before it (the batch is all or
    /// nothing: none of them is in a plan).
    pub placed: u32,
    /// Nodes considered.
    pub nodes: u32,
    /// Nodes rejected, counted per reason.
    pub reasons: Vec<ReasonCount>,
    /// Each rejected node with its filter and reason ([`Explain::Full`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<NodeRejection>,
}

impl fmt::Display for NoValidHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no valid host for instance {} of request {:?} among {} nodes",
            self.index, self.request_id, self.nodes
        )?;
        for (i, r) in self.reasons.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Why a placement could not be decided.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlaceError {
    /// The batch size is out of range.
    #[error("a batch holds 1 to {MAX_BATCH} instances, the request asks for {0}")]
    InvalidCount(u32),
    /// `first_index + count` does not fit in 32 bits.
    #[error("the request's instance indexes overflow")]
    IndexOverflow,
    /// The request names a server group the snapshot does not have.
    #[error("server group {0:?} does not exist")]
    UnknownGroup(String),
    /// "Why not node-3" asked about a node the snapshot does not have.
    #[error("node {0:?} does not exist")]
    UnknownNode(String),
    /// No node can take an instance.
    #[error("{0}")]
    NoValidHost(Box<NoValidHost>),
}

/// One filter's verdict on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterVerdict {
    /// Filter name.
    pub filter: Cow<'static, str>,
    /// Whether the node passes (filters with nothing to check pass).
    pub passed: bool,
    /// Why it does not pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// "Why not node-3": every filter's verdict, and when the node passes them
/// all, its scores and rank among the candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeExplanation {
    /// Node id.
    pub node: String,
    /// Every filter, in evaluation order.
    pub verdicts: Vec<FilterVerdict>,
    /// Whether the node passes every filter.
    pub eligible: bool,
    /// Nodes that pass every filter.
    pub candidates: u32,
    /// 1 when the node would be chosen; `None` when not eligible.
    pub rank: Option<u32>,
    /// Total score when eligible.
    pub score: Option<f64>,
    /// Score per weigher when eligible.
    pub scores: Vec<WeigherScore>,
}

/// The outcome of one decision inside the pipeline.
#[derive(Debug)]
pub(crate) struct Decided {
    pub node: u32,
    pub score: f64,
    pub scores: Vec<WeigherScore>,
    pub candidates: u32,
    pub filtered: Vec<ReasonCount>,
    pub rejected: Vec<NodeRejection>,
}

/// Why one decision found no node.
#[derive(Debug)]
pub(crate) struct Undecided {
    pub reasons: Vec<ReasonCount>,
    pub rejected: Vec<NodeRejection>,
}

impl Undecided {
    /// "memory exhausted on 3 nodes, node draining on 1 node".
    pub fn summary(&self) -> String {
        if self.reasons.is_empty() {
            return "no node is up".into();
        }
        let parts: Vec<String> = self.reasons.iter().map(ToString::to_string).collect();
        parts.join(", ")
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct WeighMeta {
    active: bool,
    multiplier: f64,
    min: f64,
    range: f64,
    /// Where the raw values are: the node's `Hot::raw` slot for the core
    /// weighers, else the weigher's `Scratch::raws` (one per candidate).
    slot: Option<usize>,
}

/// Buffers reused by every decision, so the hot path does not allocate per
/// node.
#[derive(Debug, Default)]
struct Scratch {
    candidates: Vec<u32>,
    /// Marks of each filter and each weigher, by index.
    filter_marks: Vec<NodeMarks>,
    weigher_marks: Vec<NodeMarks>,
    /// Raw values of each weigher, one per candidate.
    raws: Vec<Vec<f64>>,
    meta: Vec<WeighMeta>,
    totals: Vec<f64>,
    rejections: Rejections,
    active_filters: Vec<usize>,
    core_filters: Vec<usize>,
    active_weighers: Vec<usize>,
    /// `(weigher, multiplier / range, min)` of each non-core weigher that
    /// separates the candidates, in weigher order.
    terms: Vec<(usize, f64, f64)>,
}

/// The scheduler over one snapshot: placement, and (in their modules) the
/// rebalance, consolidation, expand and drain planners and the plan check.
#[derive(Debug)]
pub struct Scheduler {
    pub(crate) state: ClusterState,
    pub(crate) filters: Vec<AnyFilter>,
    weighers: Vec<AnyWeigher>,
    scratch: Scratch,
}

impl Scheduler {
    /// Validates and indexes a snapshot.
    pub fn new(snapshot: &ClusterSnapshot) -> Result<Self, BuildStateError> {
        let state = ClusterState::build(snapshot)?;
        let filters = default_filters();
        let weighers = default_weighers();
        let scratch = Scratch {
            filter_marks: vec![NodeMarks::default(); filters.len()],
            weigher_marks: vec![NodeMarks::default(); weighers.len()],
            raws: vec![Vec::new(); weighers.len()],
            meta: vec![WeighMeta::default(); weighers.len()],
            ..Scratch::default()
        };
        Ok(Self {
            state,
            filters,
            weighers,
            scratch,
        })
    }

    /// Nodes in the snapshot.
    pub fn node_count(&self) -> usize {
        self.state.nodes.len()
    }

    /// Instances in the snapshot plus those committed since.
    pub fn instance_count(&self) -> usize {
        self.state.instances.len()
    }

    /// Standard deviation of the CPU utilisation of the nodes that are up:
    /// the imbalance the rebalance planner reduces.
    pub fn imbalance(&self) -> f64 {
        self.state.imbalance()
    }

    /// Decides where the instances of `request` go. Changes nothing: commit
    /// the plan with [`commit_placement`](Self::commit_placement).
    pub fn place(
        &mut self,
        request: &PlacementRequest,
        explain: Explain,
    ) -> Result<PlacementPlan, PlaceError> {
        if request.count == 0 || request.count > MAX_BATCH {
            return Err(PlaceError::InvalidCount(request.count));
        }
        request
            .first_index
            .checked_add(request.count - 1)
            .ok_or(PlaceError::IndexOverflow)?;
        let demand = self.demand_for(request)?;
        let full = explain == Explain::Full;
        let mut placements = Vec::with_capacity(request.count as usize);
        let mut chosen = Vec::with_capacity(request.count as usize);
        let mut failure = None;
        for k in 0..request.count {
            let index = request.first_index + k;
            let seed = instance_seed(&request.request_id, index);
            match self.decide(&demand, seed, full) {
                Ok(d) => {
                    self.state.add_load(d.node, &demand.res, &demand.groups);
                    chosen.push(d.node);
                    placements.push(Placement {
                        index,
                        node: self.state.meta[d.node as usize].id.clone(),
                        score: d.score,
                        scores: d.scores,
                        candidates: d.candidates,
                        filtered: d.filtered,
                        rejected: d.rejected,
                    });
                }
                Err(u) => {
                    failure = Some(NoValidHost {
                        request_id: request.request_id.clone(),
                        index,
                        placed: k,
                        nodes: ix(self.state.nodes.len()),
                        reasons: u.reasons,
                        rejected: u.rejected,
                    });
                    break;
                }
            }
        }
        for &node in chosen.iter().rev() {
            self.state.remove_load(node, &demand.res, &demand.groups);
        }
        match failure {
            Some(f) => Err(PlaceError::NoValidHost(Box::new(f))),
            None => Ok(PlacementPlan {
                request: request.clone(),
                placements,
            }),
        }
    }

    /// Re-checks a plan against the current state and, when it still holds,
    /// records its instances (ids `"{request_id}/{index}"`) so later
    /// decisions see them.
    pub fn commit_placement(&mut self, plan: &PlacementPlan) -> Result<(), CheckPlanError> {
        check::check_placement(self, plan)?;
        let demand = self.demand_for(&plan.request).map_err(|_| {
            CheckPlanError::GroupGone(plan.request.group.clone().unwrap_or_default())
        })?;
        for p in &plan.placements {
            let Some(&node) = self.state.node_index.get(&p.node) else {
                return Err(CheckPlanError::NodeGone(p.node.clone()));
            };
            let id = placed_id(&plan.request.request_id, p.index);
            let index = ix(self.state.instances.len());
            self.state.add_load(node, &demand.res, &demand.groups);
            self.state.instance_index.insert(id.clone(), index);
            self.state.instances.push(InstanceRt {
                id,
                node,
                res: demand.res,
                cpu: 0.0,
                dirty: 0.0,
                groups: demand.groups.clone(),
                pinned: false,
                migrating_to: NONE,
                zone: demand.zone,
                labels: demand.labels.clone(),
            });
            self.state.node_instances[node as usize].push(index);
        }
        Ok(())
    }

    /// "Why not node-3": every filter's verdict on `node` for the first
    /// instance of `request`, and its scores and rank when it passes.
    pub fn explain_node(
        &mut self,
        request: &PlacementRequest,
        node: &str,
    ) -> Result<NodeExplanation, PlaceError> {
        let demand = self.demand_for(request)?;
        let Some(&n) = self.state.node_index.get(node) else {
            return Err(PlaceError::UnknownNode(node.to_owned()));
        };
        let ctx = Ctx {
            state: &self.state,
            demand: &demand,
        };
        let verdicts: Vec<FilterVerdict> = self
            .filters
            .iter()
            .map(|f| {
                let failed = f.applies(&ctx) && f.check(&ctx, n).is_some();
                FilterVerdict {
                    filter: Cow::Borrowed(f.name()),
                    passed: !failed,
                    reason: failed.then(|| f.explain(&ctx, n)),
                }
            })
            .collect();
        let eligible = verdicts.iter().all(|v| v.passed);
        let seed = instance_seed(&request.request_id, request.first_index);
        self.filter_and_weigh(&demand, false);
        let candidates = ix(self.scratch.candidates.len());
        let mut out = NodeExplanation {
            node: node.to_owned(),
            verdicts,
            eligible,
            candidates,
            rank: None,
            score: None,
            scores: Vec::new(),
        };
        if let Some(pos) = self.scratch.candidates.iter().position(|&c| c == n) {
            let key = tie_key(seed, self.state.meta[n as usize].hash);
            let total = self.scratch.totals[pos];
            let ahead = self
                .scratch
                .candidates
                .iter()
                .zip(&self.scratch.totals)
                .filter(|&(&c, &t)| {
                    t > total
                        || (t == total
                            && c != n
                            && tie_key(seed, self.state.meta[c as usize].hash) > key)
                })
                .count();
            out.rank = Some(ix(ahead + 1));
            out.score = Some(total);
            out.scores = self.scores_at(pos, n);
        }
        Ok(out)
    }

    /// Resolves a request into the demand the filters evaluate.
    pub(crate) fn demand_for(&self, request: &PlacementRequest) -> Result<Demand, PlaceError> {
        let state = &self.state;
        let mut groups = Vec::new();
        if let Some(group) = &request.group {
            match state.group_index.get(group) {
                Some(&g) => groups.push(g),
                None => return Err(PlaceError::UnknownGroup(group.clone())),
            }
        }
        let mut unknown_names = Vec::new();
        let zone = state.resolve_zone(request.zone.as_deref(), &mut unknown_names);
        let labels = state.resolve_labels(&request.labels, &mut unknown_names);
        let preferred_zone = request
            .preferred_zone
            .as_deref()
            .and_then(|z| state.zone_index.get(z).copied());
        Ok(Demand {
            res: request.resources,
            cpu: 0.0,
            zone,
            labels,
            groups,
            moving: None,
            strategy: request.strategy.unwrap_or(state.config.strategy),
            preferred_zone,
            headroom: None,
            unknown_names,
        })
    }

    /// The first filter that rejects `node` for `demand`, with its sentence.
    pub(crate) fn first_rejection(
        &self,
        demand: &Demand,
        node: u32,
    ) -> Option<(&'static str, String)> {
        let ctx = Ctx {
            state: &self.state,
            demand,
        };
        self.filters
            .iter()
            .find(|f| f.applies(&ctx) && f.check(&ctx, node).is_some())
            .map(|f| (f.name(), f.explain(&ctx, node)))
    }

    /// Whether `node` passes every filter for `demand`.
    pub(crate) fn passes(&self, demand: &Demand, node: u32) -> bool {
        let ctx = Ctx {
            state: &self.state,
            demand,
        };
        !self
            .filters
            .iter()
            .any(|f| f.applies(&ctx) && f.check(&ctx, node).is_some())
    }

    /// One decision on the current state.
    pub(crate) fn decide(
        &mut self,
        demand: &Demand,
        seed: u64,
        explain: bool,
    ) -> Result<Decided, Undecided> {
        let (filtered, rejected) = self.filter_and_weigh(demand, explain);
        let Scratch {
            candidates, totals, ..
        } = &self.scratch;
        if candidates.is_empty() {
            return Err(Undecided {
                reasons: filtered,
                rejected,
            });
        }
        let meta = &self.state.meta;
        let mut best = 0;
        let mut best_key = None;
        for i in 1..candidates.len() {
            if totals[i] > totals[best] {
                best = i;
                best_key = None;
            } else if totals[i] == totals[best] {
                let kb = *best_key
                    .get_or_insert_with(|| tie_key(seed, meta[candidates[best] as usize].hash));
                let ki = tie_key(seed, meta[candidates[i] as usize].hash);
                if ki > kb {
                    best = i;
                    best_key = Some(ki);
                }
            }
        }
        Ok(Decided {
            node: candidates[best],
            score: totals[best],
            scores: self.scores_at(best, candidates[best]),
            candidates: ix(candidates.len()),
            filtered,
            rejected,
        })
    }

    /// Runs the filters and weighers, leaving candidates and totals in the
    /// scratch buffers. Returns the rejection counts and, when explaining,
    /// a sentence per rejected node.
    ///
    /// First a tight loop over the nodes (the zone's nodes when a zone is
    /// required) where the core filters (state, resources, instance limit)
    /// are one test on the node's 32-byte record ([`Hot`]); when it fails,
    /// the filters themselves find the reason. The other applicable filters
    /// then remove candidates (marks prepared once, O(1) per node). Then
    /// each weigher's bounds over the candidates (tracked in the first loop
    /// when no other filter runs), and one pass that normalizes and sums.
    /// With [`Explain::Full`] every filter runs its own check over every
    /// node instead; the property tests check both give one answer.
    ///
    /// [`Hot`]: crate::state::Hot
    fn filter_and_weigh(
        &mut self,
        demand: &Demand,
        explain: bool,
    ) -> (Vec<ReasonCount>, Vec<NodeRejection>) {
        let Self {
            state,
            filters,
            weighers,
            scratch,
        } = self;
        let Scratch {
            candidates,
            filter_marks,
            weigher_marks,
            raws,
            meta,
            totals,
            rejections,
            active_filters,
            core_filters,
            active_weighers,
            terms,
        } = scratch;
        let ctx = Ctx { state, demand };
        let n = state.nodes.len();
        rejections.reset(explain);
        candidates.clear();
        active_filters.clear();
        core_filters.clear();
        active_weighers.clear();
        terms.clear();
        let mut seed: Option<&[u32]> = None;
        for (fi, f) in filters.iter().enumerate() {
            if !f.applies(&ctx) {
                continue;
            }
            if !explain {
                if seed.is_none()
                    && let Some((list, reason)) = f.seed(&ctx)
                {
                    rejections.reject_many(ix(n - list.len()), reason);
                    seed = Some(list);
                    continue;
                }
                if f.is_core() {
                    core_filters.push(fi);
                    continue;
                }
            }
            f.prepare(&ctx, &mut filter_marks[fi]);
            active_filters.push(fi);
        }
        let mut extra_weighers = false;
        for (wi, w) in weighers.iter().enumerate() {
            raws[wi].clear();
            let multiplier = w.multiplier(&ctx);
            if multiplier == 0.0 || !multiplier.is_finite() || !w.applies(&ctx) {
                meta[wi] = WeighMeta::default();
                continue;
            }
            let slot = w.core_slot();
            if slot.is_none() {
                w.prepare(&ctx, &mut weigher_marks[wi]);
                extra_weighers = true;
            }
            meta[wi] = WeighMeta {
                active: true,
                multiplier,
                min: f64::INFINITY,
                // Holds the maximum until the loop is done.
                range: f64::NEG_INFINITY,
                slot,
            };
            active_weighers.push(wi);
        }
        let fast = !core_filters.is_empty();
        let need = [
            f32_up(f64::from(demand.res.vcpus)),
            f32_up(demand.res.memory_mib as f64),
            f32_up(demand.res.disk_gib as f64),
        ];
        let exclude = demand.moving.map_or(NONE, |(_, from)| from);
        let hot = &state.hot;
        let count = seed.map_or(n, <[u32]>::len);
        candidates.reserve(count);
        // Bounds of the core weighers over the candidates: tracked in the
        // filter loop when no other filter can still remove a candidate.
        let mut lo = [f32::INFINITY; 4];
        let mut hi = [f32::NEG_INFINITY; 4];
        let bound_here = fast && active_filters.is_empty();
        if fast {
            // Core filters: one tight loop over the nodes' cache lines.
            for i in 0..count {
                let node = seed.map_or(ix(i), |list| list[i]);
                let h = &hot[node as usize];
                let ok = (need[0] <= h.free[0])
                    & (need[1] <= h.free[1])
                    & (need[2] <= h.free[2])
                    & (h.room > 0)
                    & (node != exclude);
                // A refused node the filters pass after all (the test is
                // conservative) is a candidate.
                if ok || !reject_core(filters, core_filters, &ctx, rejections, node) {
                    candidates.push(node);
                    if bound_here {
                        widen(&mut lo, &mut hi, h.raw);
                    }
                }
            }
        } else {
            match seed {
                Some(list) => candidates.extend_from_slice(list),
                None => candidates.extend(0..ix(n)),
            }
        }
        if !active_filters.is_empty() {
            candidates.retain(|&node| {
                for &fi in active_filters.iter() {
                    if let Some(reason) = filters[fi].check_prepared(&ctx, &filter_marks[fi], node)
                    {
                        rejections.filter = u8::try_from(fi).unwrap_or(u8::MAX);
                        rejections.reject(node, reason);
                        return false;
                    }
                }
                true
            });
        }
        if !bound_here {
            for &node in candidates.iter() {
                widen(&mut lo, &mut hi, hot[node as usize].raw);
            }
        }
        if extra_weighers {
            for &wi in active_weighers.iter() {
                if meta[wi].slot.is_some() {
                    continue;
                }
                let w = &weighers[wi];
                let marks = &weigher_marks[wi];
                let raw = &mut raws[wi];
                raw.extend(candidates.iter().map(|&node| w.raw(&ctx, marks, node)));
                let m = &mut meta[wi];
                for &v in raw.iter() {
                    if v < m.min {
                        m.min = v;
                    }
                    if v > m.range {
                        m.range = v;
                    }
                }
            }
        }
        let lo = lo.map(f64::from);
        let hi = hi.map(f64::from);
        let mut core_k = [0.0f64; 4];
        let mut core_min = [0.0f64; 4];
        for &wi in active_weighers.iter() {
            let m = &mut meta[wi];
            if candidates.is_empty() {
                m.min = 0.0;
                m.range = 0.0;
            } else if let Some(slot) = m.slot {
                m.min = lo[slot];
                m.range = hi[slot] - lo[slot];
            } else {
                m.range -= m.min;
            }
            if m.range > 0.0 {
                match m.slot {
                    Some(slot) => {
                        core_k[slot] = m.multiplier / m.range;
                        core_min[slot] = m.min;
                    }
                    None => terms.push((wi, m.multiplier / m.range, m.min)),
                }
            }
        }
        // Totals add the weighers in their order: the four core ones (a
        // zero coefficient adds exactly nothing), then the others.
        totals.clear();
        totals.resize(candidates.len(), 0.0);
        for (t, &node) in totals.iter_mut().zip(candidates.iter()) {
            let r = hot[node as usize].raw.map(f64::from);
            *t = core_k[0] * (r[0] - core_min[0])
                + core_k[1] * (r[1] - core_min[1])
                + core_k[2] * (r[2] - core_min[2])
                + core_k[3] * (r[3] - core_min[3]);
        }
        for &(wi, k, min) in terms.iter() {
            for (t, &r) in totals.iter_mut().zip(&raws[wi]) {
                *t += k * (r - min);
            }
        }
        let filtered: Vec<ReasonCount> = Reason::ALL
            .iter()
            .zip(rejections.counts)
            .filter(|&(_, c)| c > 0)
            .map(|(&reason, nodes)| ReasonCount { reason, nodes })
            .collect();
        let rejected = match &rejections.nodes {
            Some(list) => list
                .iter()
                .map(|&(node, fi)| {
                    let f = &filters[fi as usize];
                    NodeRejection {
                        node: state.meta[node as usize].id.clone(),
                        filter: Cow::Borrowed(f.name()),
                        reason: f.explain(&ctx, node),
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        (filtered, rejected)
    }

    /// Per-weigher scores of the candidate at `pos` (node `node`) after a
    /// weighing.
    fn scores_at(&self, pos: usize, node: u32) -> Vec<WeigherScore> {
        let hot = &self.state.hot[node as usize];
        self.weighers
            .iter()
            .zip(&self.scratch.meta)
            .zip(&self.scratch.raws)
            .filter(|((_, m), _)| m.active)
            .map(|((w, m), raw)| {
                let r = match m.slot {
                    Some(s) => f64::from(hot.raw[s]),
                    None => raw[pos],
                };
                let normalized = if m.range > 0.0 {
                    (r - m.min) / m.range
                } else {
                    0.0
                };
                WeigherScore {
                    weigher: Cow::Borrowed(w.name()),
                    raw: r,
                    normalized,
                    multiplier: m.multiplier,
                    weighted: normalized * m.multiplier,
                }
            })
            .collect()
    }
}

/// Widens the core weighers' bounds to include raw values `r` (a fixed-size
/// loop the compiler unrolls into registers).
#[inline(always)]
fn widen(lo: &mut [f32; 4], hi: &mut [f32; 4], r: [f32; 4]) {
    for k in 0..4 {
        if r[k] < lo[k] {
            lo[k] = r[k];
        }
        if r[k] > hi[k] {
            hi[k] = r[k];
        }
    }
}

/// Finds which core filter rejects `node` (the fast path refused it) and
/// records the rejection; false when none does. Kept out of line so the
/// fast loop stays small.
#[cold]
#[inline(never)]
fn reject_core(
    filters: &[AnyFilter],
    core: &[usize],
    ctx: &Ctx<'_>,
    rejections: &mut Rejections,
    node: u32,
) -> bool {
    for &fi in core {
        if let Some(reason) = filters[fi].check(ctx, node) {
            rejections.filter = u8::try_from(fi).unwrap_or(u8::MAX);
            rejections.reject(node, reason);
            return true;
        }
    }
    false
}

/// The id a committed placement gets in the scheduler's state.
pub fn placed_id(request_id: &str, index: u32) -> String {
    format!("{request_id}/{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::test_support::{scheduler, snapshot};
    use crate::model::{Resources, Strategy};

    fn req(id: &str) -> PlacementRequest {
        PlacementRequest::new(id, Resources::new(1, 1024, 10))
    }

    #[test]
    fn spreads_to_the_emptier_node_and_reports_scores() {
        let mut s = scheduler();
        let plan = s.place(&req("r1"), Explain::Summary).unwrap();
        let p = &plan.placements[0];
        assert_eq!(p.node, "b");
        assert_eq!(p.candidates, 2);
        assert_eq!(
            p.filtered,
            vec![ReasonCount {
                reason: Reason::NodeDown,
                nodes: 1
            }]
        );
        let ram = p.scores.iter().find(|s| s.weigher == "ram").unwrap();
        assert_eq!(ram.normalized, 1.0);
        let total: f64 = p.scores.iter().map(|s| s.weighted).sum();
        assert!((total - p.score).abs() < 1e-12);
        assert!(p.rejected.is_empty());
    }

    #[test]
    fn pack_prefers_the_fuller_node() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.strategy = Some(Strategy::Pack);
        let plan = s.place(&r, Explain::Summary).unwrap();
        assert_eq!(plan.placements[0].node, "a");
    }

    #[test]
    fn no_valid_host_counts_reasons_and_explains_each_node() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.resources.memory_mib = 12_289;
        let err = s.place(&r, Explain::Full).unwrap_err();
        let PlaceError::NoValidHost(nvh) = err.clone() else {
            panic!("expected no valid host, got {err:?}");
        };
        assert_eq!(
            err.to_string(),
            "no valid host for instance 0 of request \"r1\" among 3 nodes: \
             node down on 1 node, memory exhausted on 2 nodes"
        );
        assert_eq!(nvh.rejected.len(), 3);
        let a = nvh.rejected.iter().find(|r| r.node == "a").unwrap();
        assert_eq!(a.filter, "resources");
        assert_eq!(
            a.reason,
            "memory: needs 12289 MiB, 6144 MiB free after ratio 1.5"
        );
        // Node b has 12288 MiB: fits only after the ratio.
        r.resources.memory_mib = 12_288;
        assert_eq!(
            s.place(&r, Explain::Summary).unwrap().placements[0].node,
            "b"
        );
    }

    #[test]
    fn batch_does_not_double_book() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.resources.memory_mib = 6144;
        r.count = 3;
        // a has 6144 free, b 12288: room for exactly 3.
        let plan = s.place(&r, Explain::Summary).unwrap();
        let mut nodes: Vec<&str> = plan.placements.iter().map(|p| p.node.as_str()).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, vec!["a", "b", "b"]);
        r.count = 4;
        let err = s.place(&r, Explain::Summary).unwrap_err();
        assert!(matches!(err, PlaceError::NoValidHost(ref n) if n.placed == 3 && n.index == 3));
        // The failed batch left nothing behind.
        r.count = 3;
        assert_eq!(s.place(&r, Explain::Summary).unwrap(), plan);
    }

    #[test]
    fn anti_affinity_batch_spreads_members() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.group = Some("anti".into());
        r.count = 2;
        // i1 (member) is on a; c is down; only b is left for one member.
        let err = s.place(&r, Explain::Summary).unwrap_err();
        let PlaceError::NoValidHost(nvh) = err else {
            panic!("expected no valid host");
        };
        assert_eq!(nvh.placed, 1);
        assert!(nvh.reasons.contains(&ReasonCount {
            reason: Reason::AntiAffinity,
            nodes: 2
        }));
    }

    #[test]
    fn affinity_batch_in_an_empty_group_shares_one_node() {
        let mut snap = snapshot();
        snap.groups.push(crate::model::ServerGroup {
            id: "fresh".into(),
            policy: crate::model::GroupPolicy::Affinity,
            max_per_node: None,
        });
        let mut s = Scheduler::new(&snap).unwrap();
        let mut r = req("r1");
        r.group = Some("fresh".into());
        r.count = 3;
        let plan = s.place(&r, Explain::Summary).unwrap();
        let first = &plan.placements[0].node;
        assert!(plan.placements.iter().all(|p| &p.node == first));
        assert!(plan.placements[1].filtered.contains(&ReasonCount {
            reason: Reason::Affinity,
            nodes: 1
        }));
    }

    #[test]
    fn commit_records_and_rechecks() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.resources.memory_mib = 12_288;
        let plan = s.place(&r, Explain::Summary).unwrap();
        s.commit_placement(&plan).unwrap();
        assert_eq!(s.instance_count(), 2);
        // Committing again conflicts: same ids, and no room left.
        assert!(s.commit_placement(&plan).is_err());
        let err = s.place(&r, Explain::Summary).unwrap_err();
        assert!(matches!(err, PlaceError::NoValidHost(_)));
    }

    #[test]
    fn why_not_node() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.labels.insert("disk".into(), "ssd".into());
        let why = s.explain_node(&r, "b").unwrap();
        assert!(!why.eligible);
        let labels = why.verdicts.iter().find(|v| v.filter == "labels").unwrap();
        assert_eq!(
            labels.reason.as_deref(),
            Some("labels: node lacks disk=ssd")
        );
        let why = s.explain_node(&r, "a").unwrap();
        assert!(why.eligible);
        assert_eq!(why.rank, Some(1));
        assert_eq!(why.candidates, 1);
        assert!(matches!(
            s.explain_node(&r, "zz"),
            Err(PlaceError::UnknownNode(_))
        ));
        let why = s.explain_node(&req("r2"), "a").unwrap();
        assert_eq!(why.rank, Some(2));
    }

    #[test]
    fn rejects_bad_requests() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.count = 0;
        assert_eq!(
            s.place(&r, Explain::Summary),
            Err(PlaceError::InvalidCount(0))
        );
        r.count = 2;
        r.first_index = u32::MAX;
        assert_eq!(
            s.place(&r, Explain::Summary),
            Err(PlaceError::IndexOverflow)
        );
        let mut r = req("r1");
        r.group = Some("nope".into());
        assert!(matches!(
            s.place(&r, Explain::Summary),
            Err(PlaceError::UnknownGroup(_))
        ));
    }

    #[test]
    fn ties_break_by_request_id_deterministically() {
        let mut snap = snapshot();
        snap.instances.clear();
        snap.nodes[2].state = crate::model::NodeState::Up;
        let mut s = Scheduler::new(&snap).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..32 {
            let id = format!("r{i}");
            let first = s.place(&req(&id), Explain::Summary).unwrap();
            let again = s.place(&req(&id), Explain::Summary).unwrap();
            assert_eq!(first, again);
            seen.insert(first.placements[0].node.clone());
        }
        // Identical empty nodes: different request ids pick different nodes.
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn summary_and_full_explain_choose_the_same_node() {
        let mut s = scheduler();
        let mut r = req("r1");
        r.zone = Some("z1".into());
        let a = s.place(&r, Explain::Summary).unwrap();
        let b = s.place(&r, Explain::Full).unwrap();
        assert_eq!(a.placements[0].node, b.placements[0].node);
        assert_eq!(a.placements[0].filtered, b.placements[0].filtered);
        assert_eq!(b.placements[0].rejected.len(), 1);
        assert_eq!(
            b.placements[0].rejected[0].reason,
            "zone: node is in zone \"z2\", zone \"z1\" is required"
        );
    }
}
