//! The scheduler: placement (filters, weighers, select), and the rebalance,
//! consolidation, expand and drain planners. A library with no I/O that
//! works on a snapshot of cluster state; the controller leader builds a
//! [`Scheduler`] from its [`ClusterSnapshot`], asks for a plan, and re-checks
//! the plan against the then-current state ([`check`]) before committing it.
//!
//! Where things are:
//! - [`model`]: the serde input types (snapshot, nodes, instances, server
//!   groups, migrations in flight, placement requests, cluster config).
//! - `state`: the indexed working copy (compact node records, zone, label
//!   and group indexes) every stage reads.
//! - `filter/`: one file per filter; `weigh/`: one file per weigher.
//! - [`place`]: the pipeline, [`PlacementPlan`], explanations ("why not
//!   node-3") and [`NoValidHost`] counts.
//! - [`rebalance`], [`consolidate`] (and expand), [`drain`]: the migration
//!   planners, returning [`Move`]s with reason and expected gain.
//! - [`check`]: re-checking plans against a newer snapshot.
//! - [`testing`]: synthetic cluster generator and invariant checker, used by
//!   the tests and by `src/bin/bench-scheduler.rs`.
//!
//! Decisions are deterministic: the only randomness is tie-breaking by a
//! hash of the request id, the instance index and the node id.
//!
//! ```
//! use nephele_scheduler::{Explain, PlacementRequest, Resources, Scheduler, testing};
//!
//! let snapshot = testing::generate(&testing::ClusterSpec::new(20, 100, 1));
//! let mut scheduler = Scheduler::new(&snapshot)?;
//! let request = PlacementRequest::new("req-1", Resources::new(2, 4096, 20));
//! let plan = scheduler.place(&request, Explain::Summary)?;
//! scheduler.commit_placement(&plan)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod check;
pub mod consolidate;
pub mod drain;
mod filter;
mod hash;
pub mod model;
mod moves;
pub mod place;
pub mod rebalance;
mod state;
pub mod testing;
mod weigh;

pub use check::CheckPlanError;
pub use consolidate::{ConsolidateParams, ConsolidatePlan, ExpandParams, ExpandPlan};
pub use drain::{DrainParams, DrainPlan};
pub use filter::Reason;
pub use hash::SplitMix64;
pub use model::{
    ClusterConfig, ClusterSnapshot, GroupPolicy, Instance, MigrationInFlight, Node, NodeState,
    OvercommitRatios, PlacementRequest, Resources, ServerGroup, Strategy, WeigherMultipliers,
};
pub use moves::{Move, MoveKind};
pub use place::{
    Explain, NoValidHost, NodeExplanation, PlaceError, Placement, PlacementPlan, Scheduler,
};
pub use rebalance::{RebalanceParams, RebalancePlan, RebalanceStop};
pub use state::BuildStateError;
