//! The control-plane state machine: every resource the API holds, and the
//! pure function `apply(state, command) -> result` that changes it. No I/O and
//! no Raft types, so it can be property-tested and replayed from a log.
