//! Arbitrary commands against a populated state: the input is up to 16
//! envelopes, each a 2-byte little-endian length and that many bytes of
//! the log encoding (`codec::encode_envelope`), so any command with any
//! names, texts, numbers, actor, request id and fence can be reached by
//! mutating encoded seeds. Each decoded envelope is applied in term 1. The
//! properties: no panic; a refused command changes nothing but the
//! bookkeeping every command does (the applied counter, the clock,
//! expiring old request ids) and, for a person's request, one
//! `request.refused` audit event; the state survives a snapshot round trip.

use std::collections::BTreeMap;

use nephele_state::codec::{self, decode_envelope, encode_envelope};
use nephele_state::model::{
    GroupPolicy, ImageState, InstanceState, MigrationState, Quota, Resources, Role,
};
use nephele_state::{Command, Envelope, InstanceSpec, State, apply};

/// Most envelopes taken from one input.
pub const MAX_COMMANDS: usize = 16;
/// The term every envelope is applied in.
pub const TERM: u64 = 1;

fn res(vcpus: u64, memory_mib: u64, disk_gib: u64) -> Resources {
    Resources {
        vcpus,
        memory_mib,
        disk_gib,
    }
}

fn spec(flavor: &str, group: Option<&str>) -> InstanceSpec {
    InstanceSpec {
        flavor: format!("flavors/{flavor}"),
        image: "images/debian".into(),
        server_group: group.map(str::to_owned),
        labels: BTreeMap::from([("tier".to_owned(), "web".to_owned())]),
        ha: true,
    }
}

/// The commands that build the populated state: two projects, users with
/// roles and a token, flavors, images, two nodes, a server group,
/// instances (one running on a node, one migrating), key-value entries.
pub fn setup() -> Vec<Command> {
    let mut c = Vec::new();
    for p in ["a", "b"] {
        c.push(Command::CreateProject {
            project_id: p.into(),
            display_name: format!("project {p}"),
            quota: Some(Quota {
                instances: 4,
                resources: res(8, 8192, 100),
            }),
        });
    }
    c.push(Command::CreateUser {
        user_id: "alice".into(),
        display_name: "Alice".into(),
        operator: false,
    });
    c.push(Command::CreateUser {
        user_id: "root".into(),
        display_name: String::new(),
        operator: true,
    });
    c.push(Command::SetRole {
        user: "users/alice".into(),
        project: "projects/a".into(),
        role: Some(Role::Editor),
    });
    c.push(Command::CreateToken {
        user: "users/alice".into(),
        token_id: "t1".into(),
        secret_hash: "hash".into(),
        expire_time: Some(10_000_000),
    });
    c.push(Command::CreateFlavor {
        flavor_id: "small".into(),
        resources: res(1, 512, 10),
    });
    c.push(Command::CreateFlavor {
        flavor_id: "big".into(),
        resources: res(4, 4096, 40),
    });
    c.push(Command::CreateImage {
        image_id: "debian".into(),
        format: "raw".into(),
        size_bytes: 1 << 20,
        checksum: "sha256:00".into(),
        state: ImageState::Active,
    });
    for n in ["n1", "n2"] {
        c.push(Command::RegisterNode {
            node_id: n.into(),
            address: format!("{n}:7100"),
            capacity: res(8, 8192, 200),
            labels: BTreeMap::new(),
        });
    }
    c.push(Command::CreateServerGroup {
        project: "projects/a".into(),
        group_id: "g".into(),
        policy: GroupPolicy::AntiAffinity,
        max_per_node: Some(2),
    });
    for (i, group) in [(1, Some("projects/a/serverGroups/g")), (2, None), (3, None)] {
        c.push(Command::CreateInstance {
            project: "projects/a".into(),
            instance_id: format!("web-{i}"),
            spec: spec("small", group),
            operation_id: format!("op-{i}"),
        });
    }
    for i in [1, 2] {
        c.push(Command::ScheduleInstance {
            instance: format!("projects/a/instances/web-{i}"),
            node: "nodes/n1".into(),
            expected_generation: 1,
        });
        for state in [InstanceState::Starting, InstanceState::Running] {
            c.push(Command::SetInstanceState {
                instance: format!("projects/a/instances/web-{i}"),
                state,
                reason: String::new(),
                expected_generation: None,
            });
        }
    }
    c.push(Command::CreateMigration {
        migration_id: "m1".into(),
        instance: "projects/a/instances/web-2".into(),
        target: "nodes/n2".into(),
        max_downtime_ms: 0,
        cause: String::new(),
    });
    c.push(Command::SetMigrationState {
        migration: "migrations/m1".into(),
        state: MigrationState::Running,
        bytes_copied: 4096,
        reason: String::new(),
    });
    c.push(Command::KvPut {
        key: "config/x".into(),
        value: vec![1, 2, 3],
    });
    c
}

/// The populated state, and what each setup command answered.
pub fn populated() -> (State, Vec<String>) {
    let mut s = State::default();
    let answers = setup()
        .into_iter()
        .enumerate()
        .map(|(i, command)| {
            let env = Envelope::new(1_000 + i as u64, "users/root", command);
            format!("{:?}", apply(&mut s, &env, TERM))
        })
        .collect();
    (s, answers)
}

/// Splits the input into encoded envelopes.
pub fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < MAX_COMMANDS && data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let body = &data[2..];
        let len = len.min(body.len());
        out.push(&body[..len]);
        data = &body[len..];
    }
    out
}

/// Checks that refusing `env` left `after` as `before` but for the
/// bookkeeping and at most one audit event.
fn check_refusal(before: &State, after: &State, env: &Envelope) {
    let mut expected = before.clone();
    expected.applied = after.applied;
    expected.now = after.now;
    expected.requests = after.requests.clone();
    expected.request_order = after.request_order.clone();
    expected.events = after.events.clone();
    expected.next_event_seq = after.next_event_seq;
    // A person's call (an envelope with an origin) is audited whatever its
    // result: exactly one record, saying it was refused and why.
    expected.audit = after.audit.clone();
    expected.next_audit_seq = after.next_audit_seq;
    let new_audit = after.next_audit_seq - before.next_audit_seq;
    match &env.origin {
        Some(origin) => {
            assert_eq!(new_audit, 1, "a person's refused call was not audited once");
            let r = after.audit.back().expect("the audit record");
            assert_eq!(r.seq, after.next_audit_seq);
            assert!(
                env.actor.starts_with(&r.actor) && origin.rpc.starts_with(&r.rpc),
                "{r:?} is not this call's"
            );
            assert!(
                !r.result.is_empty() && r.result != "ok",
                "a refused call audited as {:?}",
                r.result
            );
        }
        None => assert_eq!(new_audit, 0, "a system command was audited"),
    }
    assert_eq!(after.applied, before.applied + 1);
    assert!(
        after
            .requests
            .keys()
            .all(|k| before.requests.contains_key(k)),
        "a refused request was remembered"
    );
    let new_events = after.next_event_seq - before.next_event_seq;
    assert!(new_events <= 1, "{new_events} events for a refused command");
    if new_events == 1 {
        let e = after.events.back().expect("the new event");
        assert_eq!(e.kind, "request.refused");
        assert_eq!(e.actor, env.actor);
    }
    assert!(
        after == &expected,
        "a refused {:?} changed the state",
        env.command
    );
}

/// Fuzz target `apply_command`.
pub fn apply_target(data: &[u8]) {
    // The raw input through every decoder of the state's encodings.
    let _ = decode_envelope(data);
    let _ = codec::decode_outcome(data);
    let _ = codec::decode_snapshot(data);

    let envelopes: Vec<Envelope> = frames(data)
        .into_iter()
        .filter_map(|f| decode_envelope(f).ok())
        .collect();
    if envelopes.is_empty() {
        return;
    }
    let (mut s, _) = populated();
    for env in &envelopes {
        let before = s.clone();
        if apply(&mut s, env, TERM).is_err() {
            check_refusal(&before, &s, env);
        }
    }
    let restored = codec::decode_snapshot(&codec::encode_snapshot(&s)).expect("a snapshot reads");
    assert!(restored == s, "the snapshot round trip changed the state");
}

/// Frames `envelopes` as the target reads them.
pub fn encode(envelopes: &[Envelope]) -> Vec<u8> {
    let mut out = Vec::new();
    for env in envelopes {
        let bytes = encode_envelope(env);
        let len = u16::try_from(bytes.len()).expect("a small envelope");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Commands a person, an operator and the control loops send, against the
/// populated state's resources (most succeed, some are refused).
pub fn seeds() -> Vec<Vec<u8>> {
    let user = |c: Command| Envelope::new(50_000, "users/alice", c);
    let system = |c: Command| Envelope::new(50_000, "system", c);
    let one = |env: Envelope| encode(&[env]);
    let mut out: Vec<Vec<u8>> = setup()
        .into_iter()
        .map(|c| one(Envelope::new(2_000, "users/root", c)))
        .collect();
    out.push(one(user(Command::CreateInstance {
        project: "projects/a".into(),
        instance_id: "web-9".into(),
        spec: spec("big", Some("projects/a/serverGroups/g")),
        operation_id: "op-9".into(),
    })));
    out.push(one(user(Command::DeleteInstance {
        instance: "projects/a/instances/web-1".into(),
        operation_id: "op-del".into(),
    })));
    out.push(one(user(Command::ResizeInstance {
        instance: "projects/a/instances/web-3".into(),
        flavor: "flavors/big".into(),
        node_limit: Some(Resources {
            vcpus: 64,
            memory_mib: 6144,
            disk_gib: 100,
        }),
    })));
    out.push(one(user(Command::BeginInstanceAction {
        instance: "projects/a/instances/web-1".into(),
        state: InstanceState::Stopping,
        verb: "stop".into(),
        operation_id: "op-stop".into(),
        stop_timeout_ms: Some(5000),
    })));
    out.push(one(system(Command::RestartInstanceElsewhere {
        instance: "projects/a/instances/web-1".into(),
        node: "nodes/n2".into(),
    })));
    out.push(one(system(Command::SwitchMigration {
        migration: "migrations/m1".into(),
        node: "nodes/n1".into(),
        progress: None,
    })));
    out.push(one(system(Command::SetMigrationState {
        migration: "migrations/m1".into(),
        state: MigrationState::InDoubt,
        bytes_copied: 1 << 20,
        reason: String::new(),
    })));
    out.push(one(system(Command::SetMigrationState {
        migration: "migrations/m1".into(),
        state: MigrationState::Completed,
        bytes_copied: 1 << 20,
        reason: String::new(),
    })));
    out.push(one(system(Command::DeregisterNode {
        node: "nodes/n1".into(),
    })));
    out.push(one(user(Command::RemoveNode {
        node: "nodes/n2".into(),
    })));
    out.push(one(system(Command::RenewNodeCertificate {
        node_id: "n1".into(),
        serial: "0a".into(),
    })));
    out.push(one(system(Command::SetClusterCa {
        ca: nephele_state::model::SealedCaRecord {
            cluster_id: "7".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            sealed_key: vec![1, 2, 3],
        },
    })));
    out.push(one(user(Command::DeleteProject {
        project: "projects/a".into(),
    })));
    out.push(one(user(Command::KvCas {
        key: "config/x".into(),
        expected_version: 1,
        value: None,
    })));
    let mut with_id = user(Command::CreateServerGroup {
        project: "projects/b".into(),
        group_id: "g2".into(),
        policy: GroupPolicy::Affinity,
        max_per_node: None,
    });
    with_id.request_id = Some("req-1".into());
    with_id.fence_term = Some(TERM);
    out.push(encode(&[with_id.clone(), with_id]));
    out
}
