//! The scheduler: placement (filters, weighers, select), and the rebalance,
//! consolidation and drain planners. A library with no I/O that works on a
//! snapshot of cluster state.
