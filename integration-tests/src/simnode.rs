//! Simulated compute nodes for control-plane benchmarks: a
//! [`SimulatedNode`] speaks the real node protocol (`nephele.node.v1`) to a
//! real controller — registers, heartbeats, watches its assignments and
//! reports each assigned instance RUNNING (or STOPPED, DELETED) — but runs
//! no VM and needs no KVM. Resources are accounted by the controller exactly
//! as for a real node. Thousands run as tasks of one process.
//!
//! They are named as what they are everywhere: node ids `sim-node-0001`...,
//! and "simulated node" in every message and report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as node;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the bearer token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// An authenticated channel.
pub type Svc = InterceptedService<Channel, Bearer>;

/// Why a simulated node could not join.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedNodeError {
    #[error("the token holds characters a token never has")]
    Token,
    #[error("simulated node {node}: {status}")]
    Api {
        node: String,
        status: Box<tonic::Status>,
    },
}

/// Counters every simulated node of a run adds to.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Instances reported RUNNING and accepted by the controller.
    pub acked_running: AtomicU64,
    /// Instances reported DELETED and accepted.
    pub acked_deleted: AtomicU64,
    /// Reports the controller refused or that failed (retried).
    pub report_errors: AtomicU64,
    /// Heartbeats sent and answered.
    pub heartbeats: AtomicU64,
    /// Heartbeats that failed.
    pub heartbeat_errors: AtomicU64,
    /// Assignment sets received.
    pub assignment_sets: AtomicU64,
}

/// One simulated node.
#[derive(Debug, Clone)]
pub struct SimulatedNode {
    /// `sim-node-0001`...
    pub id: String,
    /// What it offers.
    pub capacity: compute::Resources,
    client: node::node_agent_client::NodeAgentClient<Svc>,
}

/// The node id of the `i`th simulated node (from 1).
pub fn sim_node_id(i: usize) -> String {
    format!("sim-node-{i:04}")
}

impl SimulatedNode {
    /// A node over `channel` (channels may be shared by many nodes).
    pub fn new(
        i: usize,
        channel: Channel,
        token: &str,
        capacity: compute::Resources,
    ) -> Result<SimulatedNode, SimulatedNodeError> {
        let header: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| SimulatedNodeError::Token)?;
        Ok(SimulatedNode {
            id: sim_node_id(i),
            capacity,
            client: node::node_agent_client::NodeAgentClient::with_interceptor(
                channel,
                Bearer(header),
            ),
        })
    }

    fn name(&self) -> String {
        format!("nodes/{}", self.id)
    }

    fn api(&self, status: tonic::Status) -> SimulatedNodeError {
        SimulatedNodeError::Api {
            node: self.id.clone(),
            status: Box::new(status),
        }
    }

    /// Registers the node; returns the heartbeat interval asked for.
    pub async fn register(&self) -> Result<Duration, SimulatedNodeError> {
        let r = self
            .client
            .clone()
            .register_node(node::RegisterNodeRequest {
                node_id: self.id.clone(),
                // No Agent service listens here: consoles cannot be relayed
                // to a simulated node.
                address: "127.0.0.1:9".into(),
                capacity: Some(self.capacity),
                labels: [("simulated".to_owned(), "true".to_owned())].into(),
            })
            .await
            .map_err(|s| self.api(s))?
            .into_inner();
        let interval = r
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(2));
        Ok(interval.max(Duration::from_millis(100)))
    }

    /// Runs until `stop` turns true: heartbeats every `interval` and
    /// acknowledges every assignment.
    pub async fn run(
        self,
        interval: Duration,
        stats: Arc<SimStats>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // What this node "runs": instance name -> boot count reported.
        let running: Arc<tokio::sync::Mutex<HashMap<String, u64>>> = Arc::default();
        let beat = {
            let me = self.clone();
            let stats = stats.clone();
            let running = running.clone();
            let mut stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => return,
                    }
                    let instances = running
                        .lock()
                        .await
                        .keys()
                        .map(|n| node::ObservedInstance {
                            name: n.clone(),
                            state: compute::InstanceState::Running as i32,
                            cpu_busy: 0.0,
                            memory_used_mib: 0,
                        })
                        .collect();
                    let r = me
                        .client
                        .clone()
                        .heartbeat(node::HeartbeatRequest {
                            node: me.name(),
                            load: None,
                            instances,
                        })
                        .await;
                    match r {
                        Ok(_) => stats.heartbeats.fetch_add(1, Ordering::Relaxed),
                        Err(_) => stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        };
        let watch = {
            let me = self.clone();
            let mut stop = stop.clone();
            async move {
                loop {
                    let stream = me
                        .client
                        .clone()
                        .watch_assignments(node::WatchAssignmentsRequest { node: me.name() })
                        .await;
                    let Ok(stream) = stream else {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                            _ = stop.changed() => return,
                        }
                    };
                    let mut stream = stream.into_inner();
                    loop {
                        let next = tokio::select! {
                            m = stream.message() => m,
                            _ = stop.changed() => return,
                        };
                        match next {
                            Ok(Some(set)) => {
                                stats.assignment_sets.fetch_add(1, Ordering::Relaxed);
                                me.reconcile(set, &running, &stats).await;
                            }
                            // The stream ended or broke: watch again.
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
        };
        tokio::join!(beat, watch);
    }

    /// Acknowledges a whole assignment set (level-triggered: only what
    /// differs from what this node reported).
    async fn reconcile(
        &self,
        set: node::Assignments,
        running: &tokio::sync::Mutex<HashMap<String, u64>>,
        stats: &SimStats,
    ) {
        for a in set.assignments {
            let Some(i) = a.instance else { continue };
            let desired =
                node::DesiredState::try_from(a.desired).unwrap_or(node::DesiredState::Unspecified);
            let reported = running.lock().await.get(&i.name).copied();
            let (state, counter) = match desired {
                node::DesiredState::DesiredRunning if reported != Some(i.boot_count) => (
                    node::ReportedState::ReportedRunning,
                    Some(&stats.acked_running),
                ),
                node::DesiredState::DesiredStopped if reported.is_some() => {
                    (node::ReportedState::ReportedStopped, None)
                }
                node::DesiredState::DesiredDeleted => (
                    node::ReportedState::ReportedDeleted,
                    Some(&stats.acked_deleted),
                ),
                _ => continue,
            };
            if self.report(&i, state, stats).await {
                match state {
                    node::ReportedState::ReportedRunning => {
                        running.lock().await.insert(i.name.clone(), i.boot_count);
                    }
                    _ => {
                        running.lock().await.remove(&i.name);
                    }
                }
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Reports one instance, retrying a few times; whether it was accepted.
    async fn report(
        &self,
        i: &compute::Instance,
        state: node::ReportedState,
        stats: &SimStats,
    ) -> bool {
        let start = Instant::now();
        loop {
            let r = self
                .client
                .clone()
                .report_instance_state(node::ReportInstanceStateRequest {
                    node: self.name(),
                    instance: i.name.clone(),
                    state: state as i32,
                    reason: "simulated node".into(),
                    boot_count: i.boot_count,
                })
                .await;
            match r {
                Ok(_) => return true,
                Err(s) if s.code() == tonic::Code::NotFound => return false,
                Err(_) => {
                    stats.report_errors.fetch_add(1, Ordering::Relaxed);
                    if start.elapsed() > Duration::from_secs(30) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_nodes_are_named_as_such() {
        assert_eq!(sim_node_id(1), "sim-node-0001");
        assert_eq!(sim_node_id(1000), "sim-node-1000");
    }
}
