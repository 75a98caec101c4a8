//! API messages as printable [`Record`]s.

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::ops::v1 as ops;
use serde_json::{Value, json};

use crate::output::Record;

/// A timestamp as RFC 3339-ish UTC text (seconds precision).
pub fn time(t: Option<&prost_types::Timestamp>) -> Value {
    match t {
        None => Value::Null,
        Some(t) => Value::String(t.to_string()),
    }
}

fn short(name: &str) -> Value {
    Value::String(name.rsplit('/').next().unwrap_or(name).to_owned())
}

fn enum_name(s: &str, prefixes: &[&str]) -> String {
    let mut s = s.to_owned();
    for p in prefixes {
        if let Some(rest) = s.strip_prefix(p) {
            s = rest.to_owned();
        }
    }
    s
}

fn res(r: Option<&compute::Resources>) -> (u64, u64, u64) {
    r.map(|r| (r.vcpus, r.memory_mib, r.disk_gib))
        .unwrap_or_default()
}

/// An instance state's name.
pub fn instance_state(v: i32) -> String {
    compute::InstanceState::try_from(v)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| v.to_string())
}

/// An instance.
pub fn instance(i: &compute::Instance) -> Record {
    let (vcpus, mem, disk) = res(i.resources.as_ref());
    vec![
        ("name", short(&i.name)),
        ("state", instance_state(i.state).into()),
        ("flavor", short(&i.flavor)),
        ("image", short(&i.image)),
        ("node", short(&i.node)),
        ("vcpus", vcpus.into()),
        ("memory_mib", mem.into()),
        ("disk_gib", disk.into()),
        ("group", short(&i.server_group)),
        ("ha", i.ha.into()),
        ("boot_count", i.boot_count.into()),
        ("labels", json!(i.labels)),
        ("reason", i.reason.clone().into()),
        ("resource", i.name.clone().into()),
        ("created", time(i.create_time.as_ref())),
    ]
}

/// An operation.
pub fn operation(o: &ops::Operation) -> Record {
    vec![
        ("name", o.name.clone().into()),
        ("verb", o.verb.clone().into()),
        ("target", o.target.clone().into()),
        ("done", o.done.into()),
        ("error", o.error.clone().into()),
        ("created", time(o.create_time.as_ref())),
    ]
}

/// A flavor.
pub fn flavor(f: &compute::Flavor) -> Record {
    let (vcpus, mem, disk) = res(f.resources.as_ref());
    vec![
        ("name", short(&f.name)),
        ("vcpus", vcpus.into()),
        ("memory_mib", mem.into()),
        ("disk_gib", disk.into()),
    ]
}

/// An image.
pub fn image(i: &compute::Image) -> Record {
    vec![
        ("name", short(&i.name)),
        ("format", i.format.clone().into()),
        ("size_bytes", i.size_bytes.into()),
        ("checksum", i.checksum.clone().into()),
        (
            "state",
            compute::ImageState::try_from(i.state)
                .map(|s| enum_name(s.as_str_name(), &["IMAGE_STATE_"]))
                .unwrap_or_default()
                .into(),
        ),
        (
            "files",
            i.files
                .iter()
                .map(|f| f.role.as_str())
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        ),
        ("created", time(i.create_time.as_ref())),
    ]
}

/// A project.
pub fn project(p: &iam::Project) -> Record {
    let q = p.quota.unwrap_or_default();
    let u = p.usage.unwrap_or_default();
    vec![
        ("name", short(&p.name)),
        ("display_name", p.display_name.clone().into()),
        (
            "instances",
            format!("{}/{}", u.instances, q.instances).into(),
        ),
        ("vcpus", format!("{}/{}", u.vcpus, q.vcpus).into()),
        (
            "memory_mib",
            format!("{}/{}", u.memory_mib, q.memory_mib).into(),
        ),
        ("disk_gib", format!("{}/{}", u.disk_gib, q.disk_gib).into()),
        ("created", time(p.create_time.as_ref())),
    ]
}

/// A user.
pub fn user(u: &iam::User) -> Record {
    let roles: Vec<String> = u
        .roles
        .iter()
        .map(|r| {
            let role = iam::Role::try_from(r.role)
                .map(|r| enum_name(r.as_str_name(), &["ROLE_"]).to_lowercase())
                .unwrap_or_default();
            format!("{}={role}", r.project.trim_start_matches("projects/"))
        })
        .collect();
    vec![
        ("name", short(&u.name)),
        ("admin", u.admin.into()),
        ("roles", json!(roles)),
        ("display_name", u.display_name.clone().into()),
        ("created", time(u.create_time.as_ref())),
    ]
}

/// A token (never its secret).
pub fn token(t: &iam::Token) -> Record {
    vec![
        ("name", t.name.clone().into()),
        ("expires", time(t.expire_time.as_ref())),
        ("created", time(t.create_time.as_ref())),
    ]
}

/// A server group.
pub fn group(g: &compute::ServerGroup) -> Record {
    vec![
        ("name", short(&g.name)),
        (
            "policy",
            compute::GroupPolicy::try_from(g.policy)
                .map(|p| p.as_str_name().to_lowercase().replace('_', "-"))
                .unwrap_or_default()
                .into(),
        ),
        (
            "max_per_node",
            if g.policy == compute::GroupPolicy::AntiAffinity as i32 {
                g.max_per_node.max(1).into()
            } else {
                Value::Null
            },
        ),
        (
            "members",
            json!(g.members.iter().map(|m| short(m)).collect::<Vec<_>>()),
        ),
        ("created", time(g.create_time.as_ref())),
    ]
}

/// A node.
pub fn node(n: &infra::Node) -> Record {
    let (cv, cm, cd) = res(n.capacity.as_ref());
    let (av, am, ad) = res(n.allocated.as_ref());
    vec![
        ("name", short(&n.name)),
        (
            "state",
            infra::NodeState::try_from(n.state)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_default()
                .into(),
        ),
        ("address", n.address.clone().into()),
        ("vcpus", format!("{av}/{cv}").into()),
        ("memory_mib", format!("{am}/{cm}").into()),
        ("disk_gib", format!("{ad}/{cd}").into()),
        ("instances", n.instances.len().into()),
        (
            "cpu_busy",
            n.load
                .as_ref()
                .map(|l| json!(l.cpu_busy))
                .unwrap_or(Value::Null),
        ),
        ("last_heartbeat", time(n.last_heartbeat.as_ref())),
    ]
}

/// One node in full (`neph node show`): capacity, allocated and measured
/// load side by side, its instances by name.
pub fn node_detail(n: &infra::Node) -> Record {
    let amounts = |r: Option<&compute::Resources>| {
        let (vcpus, memory_mib, disk_gib) = res(r);
        json!({"vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib})
    };
    vec![
        ("name", short(&n.name)),
        (
            "state",
            infra::NodeState::try_from(n.state)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_default()
                .into(),
        ),
        ("address", n.address.clone().into()),
        ("labels", json!(n.labels)),
        ("capacity", amounts(n.capacity.as_ref())),
        ("allocated", amounts(n.allocated.as_ref())),
        (
            "load",
            n.load
                .as_ref()
                .map(|l| {
                    json!({
                        "cpu_busy": l.cpu_busy,
                        "memory_used_mib": l.memory_used_mib,
                        "running_vms": l.running_vms,
                    })
                })
                .unwrap_or(Value::Null),
        ),
        ("instances", json!(n.instances)),
        ("last_heartbeat", time(n.last_heartbeat.as_ref())),
        ("created", time(n.create_time.as_ref())),
    ]
}

/// A migration.
pub fn migration(m: &infra::Migration) -> Record {
    vec![
        ("name", short(&m.name)),
        ("instance", m.instance.clone().into()),
        ("source", short(&m.source)),
        ("target", short(&m.target)),
        (
            "state",
            infra::MigrationState::try_from(m.state)
                .map(|s| enum_name(s.as_str_name(), &["MIGRATION_"]))
                .unwrap_or_default()
                .into(),
        ),
        ("target_address", m.target_address.clone().into()),
        ("bytes_copied", m.bytes_copied.into()),
        ("round", m.round.into()),
        ("bytes_remaining", m.bytes_remaining.into()),
        ("dirty_rate_bps", m.dirty_rate_bps.into()),
        ("throughput_bps", m.throughput_bps.into()),
        ("expected_downtime_ms", m.expected_downtime_ms.into()),
        ("throttle_percent", m.throttle_percent.into()),
        ("max_downtime_ms", m.max_downtime_ms.into()),
        ("downtime_us", m.downtime_us.into()),
        ("cause", m.cause.clone().into()),
        ("reason", m.reason.clone().into()),
    ]
}

/// An event.
pub fn event(e: &ops::Event) -> Record {
    vec![
        ("seq", e.seq.into()),
        ("time", time(e.time.as_ref())),
        ("actor", e.actor.clone().into()),
        ("kind", e.kind.clone().into()),
        ("resource", e.resource.clone().into()),
        ("message", e.message.clone().into()),
    ]
}

/// An audit record: who, what, when, from where, result.
pub fn audit(e: &ops::Event) -> Record {
    vec![
        ("seq", e.seq.into()),
        ("time", time(e.time.as_ref())),
        ("actor", e.actor.clone().into()),
        ("peer", e.peer.clone().into()),
        ("rpc", e.rpc.clone().into()),
        ("resource", e.resource.clone().into()),
        ("result", e.result.clone().into()),
    ]
}

/// Cluster status.
pub fn cluster(s: &infra::ClusterStatus) -> Record {
    vec![
        ("backend", s.backend.clone().into()),
        ("backend_endpoints", json!(s.backend_endpoints)),
        ("leader_id", s.leader_id.into()),
        ("term", s.term.into()),
        ("answered_by", s.answered_by.into()),
        (
            "controllers",
            json!(
                s.controllers
                    .iter()
                    .map(|c| format!("{}@{}{}", c.id, c.address, if c.leader { "*" } else { "" }))
                    .collect::<Vec<_>>()
            ),
        ),
        ("applied", s.applied.into()),
        ("projects", s.projects.into()),
        ("nodes", format!("{}/{} up", s.nodes_up, s.nodes).into()),
        (
            "instances",
            format!("{}/{} running", s.instances_running, s.instances).into(),
        ),
    ]
}
