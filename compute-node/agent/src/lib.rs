//! `neph-node`, the compute-node agent: registers this host with the
//! controllers, heartbeats its capacity and measured load, renews the
//! fencing lease of every VM, reconciles the instances assigned to it by
//! starting and supervising one detached `neph-vmm` per VM, re-adopts them
//! when it restarts, and serves the `nephele.node.v1.Agent` gRPC service
//! (consoles, console logs) to the controllers.
//!
//! Map:
//!
//! - [`config`]: flags to an [`config::AgentConfig`], capacity defaults;
//! - [`daemon`]: wiring: gRPC server, registration, heartbeats and lease
//!   renewal, the assignment watch, the reconciler;
//! - [`supervisor`]: the level-triggered reconciler and re-adoption
//!   ([`supervisor::decide`] is the whole decision table);
//! - [`instance`]: instance names, directories, `state` records, disks,
//!   taps, image files;
//! - [`image`]: uploaded images fetched from the controllers, checked and
//!   put in the image directory;
//! - [`vmm`]: the `neph-vmm` control socket client;
//! - [`migrate`]: live migration, target (`--incoming`) and source (the
//!   switchover gate answered through the controllers);
//! - [`tunnel`]: the migration stream between nodes over mutual TLS (a
//!   detached `neph-node tunnel` process on each side);
//! - [`join`]: the node's certificate: joining with `--join-token`, then
//!   mutual TLS to the controllers;
//! - [`controller`]: controller calls with failover and the bearer token;
//! - [`service`]: the `Agent` gRPC service;
//! - [`host`]: `CLOCK_MONOTONIC`, `/proc`, host capacity.
//!
//! The protocol with the controllers is `proto/nephele/node/v1/node.proto`;
//! directories, state files and fencing are described in the README.

pub mod config;
pub mod controller;
pub mod daemon;
pub mod host;
pub mod image;
pub mod instance;
pub mod join;
pub mod migrate;
pub mod service;
pub mod supervisor;
pub mod tunnel;
pub mod vmm;
