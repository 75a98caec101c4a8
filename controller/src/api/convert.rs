//! Conversions between the state machine's model and the API's messages.

use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use nephele_proto::infra::v1 as infra;
use nephele_proto::ops::v1 as ops;
use nephele_state::model::{
    self, GroupPolicy, ImageState, InstanceState, MigrationState, NodeState, Resources,
};

use super::errors::ApiError;

/// Milliseconds since the epoch to a protobuf timestamp.
pub fn ts(ms: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    })
}

/// A protobuf timestamp to milliseconds since the epoch (negative: 0).
pub fn ms(t: &prost_types::Timestamp) -> u64 {
    let s = u64::try_from(t.seconds).unwrap_or(0);
    let n = u64::try_from(t.nanos).unwrap_or(0);
    s.saturating_mul(1000).saturating_add(n / 1_000_000)
}

/// A protobuf duration to milliseconds (negative: 0).
pub fn duration_ms(d: &prost_types::Duration) -> u64 {
    let s = u64::try_from(d.seconds).unwrap_or(0);
    let n = u64::try_from(d.nanos).unwrap_or(0);
    s.saturating_mul(1000).saturating_add(n / 1_000_000)
}

/// Resources to the API.
pub fn resources(r: Resources) -> compute::Resources {
    compute::Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
    }
}

/// Resources from the API.
pub fn resources_in(r: Option<&compute::Resources>) -> Resources {
    r.map(|r| Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
    })
    .unwrap_or_default()
}

/// A project to the API.
pub fn project(p: &model::Project) -> iam::Project {
    iam::Project {
        name: p.name.clone(),
        display_name: p.display_name.clone(),
        quota: Some(iam::Quota {
            instances: p.quota.instances,
            vcpus: p.quota.resources.vcpus,
            memory_mib: p.quota.resources.memory_mib,
            disk_gib: p.quota.resources.disk_gib,
        }),
        usage: Some(iam::Quota {
            instances: p.instance_count,
            vcpus: p.usage.vcpus,
            memory_mib: p.usage.memory_mib,
            disk_gib: p.usage.disk_gib,
        }),
        create_time: ts(p.create_time),
    }
}

/// A quota from the API.
pub fn quota_in(q: &iam::Quota) -> model::Quota {
    model::Quota {
        instances: q.instances,
        resources: Resources {
            vcpus: q.vcpus,
            memory_mib: q.memory_mib,
            disk_gib: q.disk_gib,
        },
    }
}

/// A user to the API.
pub fn user(u: &model::User) -> iam::User {
    iam::User {
        name: u.name.clone(),
        display_name: u.display_name.clone(),
        admin: u.operator,
        roles: u
            .roles
            .iter()
            .map(|(p, r)| iam::RoleBinding {
                project: p.clone(),
                role: match r {
                    model::Role::Viewer => iam::Role::Reader,
                    model::Role::Editor | model::Role::Owner => iam::Role::Member,
                } as i32,
            })
            .collect(),
        create_time: ts(u.create_time),
    }
}

/// A token to the API (never its hash).
pub fn token(t: &model::Token) -> iam::Token {
    iam::Token {
        name: t.name.clone(),
        expire_time: t.expire_time.and_then(ts),
        create_time: ts(t.create_time),
    }
}

/// A flavor to the API.
pub fn flavor(f: &model::Flavor) -> compute::Flavor {
    compute::Flavor {
        name: f.name.clone(),
        resources: Some(resources(f.resources)),
    }
}

/// An image to the API.
pub fn image(i: &model::Image) -> compute::Image {
    compute::Image {
        name: i.name.clone(),
        format: i.format.clone(),
        size_bytes: i.size_bytes,
        checksum: i.checksum.clone(),
        state: match i.state {
            ImageState::Pending => compute::ImageState::Pending,
            ImageState::Active => compute::ImageState::Active,
            ImageState::Failed => compute::ImageState::Failed,
        } as i32,
        create_time: ts(i.create_time),
        files: i.files.iter().map(image_file).collect(),
    }
}

/// One image file to the API.
pub fn image_file(f: &model::ImageFileRecord) -> compute::ImageFile {
    compute::ImageFile {
        role: f.role.clone(),
        size_bytes: f.size_bytes,
        checksum: f.checksum.clone(),
    }
}

/// Image files from the API to the state.
pub fn image_files(files: &[compute::ImageFile]) -> Vec<model::ImageFileRecord> {
    files
        .iter()
        .map(|f| model::ImageFileRecord {
            role: f.role.clone(),
            size_bytes: f.size_bytes,
            checksum: f.checksum.clone(),
        })
        .collect()
}

/// An instance state to the API.
pub fn instance_state(s: InstanceState) -> compute::InstanceState {
    match s {
        InstanceState::Pending => compute::InstanceState::Pending,
        InstanceState::Scheduled => compute::InstanceState::Scheduled,
        InstanceState::Starting => compute::InstanceState::Starting,
        InstanceState::Running => compute::InstanceState::Running,
        InstanceState::Stopping => compute::InstanceState::Stopping,
        InstanceState::Stopped => compute::InstanceState::Stopped,
        InstanceState::Migrating => compute::InstanceState::Migrating,
        InstanceState::Deleting => compute::InstanceState::Deleting,
        InstanceState::Error => compute::InstanceState::Error,
    }
}

/// An instance state from the API; `None` for unspecified.
pub fn instance_state_in(v: i32) -> Result<Option<InstanceState>, ApiError> {
    let s = compute::InstanceState::try_from(v)
        .map_err(|_| ApiError::InvalidArgument(format!("unknown instance state {v}")))?;
    Ok(InstanceState::ALL
        .into_iter()
        .find(|m| instance_state(*m) == s))
}

/// An instance to the API.
pub fn instance(i: &model::Instance) -> compute::Instance {
    compute::Instance {
        name: i.name.clone(),
        flavor: i.flavor.clone(),
        image: i.image.clone(),
        server_group: i.server_group.clone().unwrap_or_default(),
        labels: i.labels.clone().into_iter().collect(),
        state: instance_state(i.state) as i32,
        reason: i.reason.clone(),
        node: i.node.clone().unwrap_or_default(),
        resources: Some(resources(i.resources)),
        generation: i.generation,
        create_time: ts(i.create_time),
        update_time: ts(i.update_time),
        ha: i.ha,
        boot_count: i.boot_count,
    }
}

/// A group policy from the API.
pub fn policy_in(v: i32) -> Result<GroupPolicy, ApiError> {
    match compute::GroupPolicy::try_from(v) {
        Ok(compute::GroupPolicy::Affinity) => Ok(GroupPolicy::Affinity),
        Ok(compute::GroupPolicy::AntiAffinity) => Ok(GroupPolicy::AntiAffinity),
        Ok(compute::GroupPolicy::SoftAffinity) => Ok(GroupPolicy::SoftAffinity),
        Ok(compute::GroupPolicy::SoftAntiAffinity) => Ok(GroupPolicy::SoftAntiAffinity),
        _ => Err(ApiError::InvalidArgument(
            "policy must be AFFINITY, ANTI_AFFINITY, SOFT_AFFINITY or SOFT_ANTI_AFFINITY".into(),
        )),
    }
}

/// A server group to the API.
pub fn server_group(g: &model::ServerGroup) -> compute::ServerGroup {
    compute::ServerGroup {
        name: g.name.clone(),
        policy: match g.policy {
            GroupPolicy::Affinity => compute::GroupPolicy::Affinity,
            GroupPolicy::AntiAffinity => compute::GroupPolicy::AntiAffinity,
            GroupPolicy::SoftAffinity => compute::GroupPolicy::SoftAffinity,
            GroupPolicy::SoftAntiAffinity => compute::GroupPolicy::SoftAntiAffinity,
        } as i32,
        members: g.members.clone(),
        create_time: ts(g.create_time),
        max_per_node: g.max_per_node.unwrap_or(0),
    }
}

/// A node state to the API.
pub fn node_state(s: NodeState) -> infra::NodeState {
    match s {
        NodeState::Up => infra::NodeState::Up,
        NodeState::Draining => infra::NodeState::Draining,
        NodeState::Disabled => infra::NodeState::Disabled,
        NodeState::Down => infra::NodeState::Down,
    }
}

/// A node to the API, with the instances placed on it.
pub fn node(n: &model::Node, instances: Vec<String>, load: Option<infra::Load>) -> infra::Node {
    infra::Node {
        name: n.name.clone(),
        address: n.address.clone(),
        capacity: Some(resources(n.capacity)),
        allocated: Some(resources(n.allocated)),
        labels: n.labels.clone().into_iter().collect(),
        state: node_state(n.state) as i32,
        last_heartbeat: ts(n.last_heartbeat),
        instances,
        load,
        create_time: ts(n.create_time),
    }
}

/// A migration to the API.
pub fn migration(m: &model::Migration) -> infra::Migration {
    infra::Migration {
        name: m.name.clone(),
        instance: m.instance.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        state: match m.state {
            MigrationState::Queued => infra::MigrationState::Queued,
            MigrationState::Running => infra::MigrationState::MigrationRunning,
            MigrationState::Completed => infra::MigrationState::Completed,
            MigrationState::Failed => infra::MigrationState::Failed,
            MigrationState::Cancelled => infra::MigrationState::Cancelled,
            MigrationState::Switching => infra::MigrationState::Switching,
            MigrationState::InDoubt => infra::MigrationState::InDoubt,
        } as i32,
        bytes_copied: m.bytes_copied,
        reason: m.reason.clone(),
        create_time: ts(m.create_time),
        update_time: ts(m.update_time),
        max_downtime_ms: m.max_downtime_ms,
        target_address: m.target_address.clone(),
        round: m.progress.round,
        bytes_remaining: m.progress.bytes_remaining,
        dirty_rate_bps: m.progress.dirty_rate_bps,
        throughput_bps: m.progress.throughput_bps,
        expected_downtime_ms: m.progress.expected_downtime_ms,
        throttle_percent: m.progress.throttle_percent,
        downtime_us: m.progress.downtime_us,
        cause: m.cause.clone(),
    }
}

/// An operation to the API.
pub fn operation(o: &model::Operation) -> ops::Operation {
    ops::Operation {
        name: o.name.clone(),
        target: o.target.clone(),
        verb: o.verb.clone(),
        done: o.done,
        error: o.error.clone().unwrap_or_default(),
        create_time: ts(o.create_time),
        update_time: ts(o.update_time),
    }
}

/// An event to the API.
pub fn event(e: &model::Event) -> ops::Event {
    ops::Event {
        seq: e.seq,
        time: ts(e.time),
        actor: e.actor.clone(),
        resource: e.resource.clone(),
        kind: e.kind.clone(),
        message: e.message.clone(),
        ..Default::default()
    }
}

/// An audit record in the event message's shape (`kind` "audit").
pub fn audit(a: &model::AuditRecord) -> ops::Event {
    ops::Event {
        seq: a.seq,
        time: ts(a.time),
        actor: a.actor.clone(),
        resource: a.resource.clone(),
        kind: "audit".into(),
        message: String::new(),
        peer: a.peer.clone(),
        rpc: a.rpc.clone(),
        result: a.result.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for t in [0, 1, 999, 1_700_000_000_123] {
            assert_eq!(ms(&ts(t).unwrap()), t);
        }
        assert_eq!(
            ms(&prost_types::Timestamp {
                seconds: -5,
                nanos: 0
            }),
            0
        );
    }

    #[test]
    fn every_instance_state_round_trips() {
        for s in InstanceState::ALL {
            assert_eq!(
                instance_state_in(instance_state(s) as i32).unwrap(),
                Some(s)
            );
        }
        assert_eq!(instance_state_in(0).unwrap(), None);
        assert!(instance_state_in(99).is_err());
    }
}
