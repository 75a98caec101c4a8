//! Property tests of the state machine as a whole: replay determinism,
//! snapshot equivalence and invariants over random command logs.

use std::collections::BTreeMap;

use nephele_state::codec::{decode_snapshot, encode_snapshot};
use nephele_state::model::{
    GroupPolicy, ImageState, InstanceState, MigrationState, NodeState, Quota, Resources,
};
use nephele_state::{Command, Envelope, InstanceSpec, NewInstance, State, apply};
use proptest::prelude::*;

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a"),
        Just("b"),
        Just("a"),
        Just("b"),
        Just("c"),
        Just("Bad")
    ]
    .prop_map(str::to_owned)
}

fn project() -> impl Strategy<Value = String> {
    id().prop_map(|i| format!("projects/{i}"))
}

fn instance() -> impl Strategy<Value = String> {
    (id(), id()).prop_map(|(p, i)| format!("projects/{p}/instances/{i}"))
}

fn node() -> impl Strategy<Value = String> {
    id().prop_map(|i| format!("nodes/{i}"))
}

fn instance_state() -> impl Strategy<Value = InstanceState> {
    proptest::sample::select(InstanceState::ALL.to_vec())
}

fn spec(project: &str, flavor: &str, image: &str, grouped: bool, ha: bool) -> InstanceSpec {
    InstanceSpec {
        flavor: format!("flavors/{flavor}"),
        image: format!("images/{image}"),
        server_group: grouped.then(|| format!("{project}/serverGroups/a")),
        labels: BTreeMap::new(),
        ha,
    }
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (id(), 0u64..4, 0u64..8).prop_map(|(project_id, instances, vcpus)| {
            Command::CreateProject {
                project_id,
                display_name: String::new(),
                quota: Some(Quota {
                    instances,
                    resources: Resources {
                        vcpus,
                        memory_mib: 4096,
                        disk_gib: 100,
                    },
                }),
            }
        }),
        (project(), 0u64..4).prop_map(|(project, instances)| Command::SetProjectQuota {
            project,
            quota: Quota {
                instances,
                resources: Resources {
                    vcpus: 4,
                    memory_mib: 4096,
                    disk_gib: 100,
                },
            }
            .into(),
        }),
        (project(), 0u64..8).prop_map(|(project, vcpus)| Command::SetProjectQuota {
            project,
            quota: nephele_state::QuotaUpdate {
                vcpus: Some(vcpus),
                ..Default::default()
            },
        }),
        project().prop_map(|project| Command::DeleteProject { project }),
        (id(), 1u64..4).prop_map(|(flavor_id, vcpus)| Command::CreateFlavor {
            flavor_id,
            resources: Resources {
                vcpus,
                memory_mib: 1024,
                disk_gib: 10,
            },
        }),
        id().prop_map(|image_id| Command::CreateImage {
            image_id,
            format: "raw".into(),
            size_bytes: 1,
            checksum: String::new(),
            state: ImageState::Active,
        }),
        (project(), id(), 0u32..3).prop_map(|(project, group_id, max)| {
            Command::CreateServerGroup {
                project,
                group_id,
                policy: GroupPolicy::AntiAffinity,
                max_per_node: (max > 0).then_some(max),
            }
        }),
        (
            project(),
            id(),
            id(),
            id(),
            id(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(project, instance_id, flavor, image, op, grouped, ha)| {
                Command::CreateInstance {
                    spec: spec(&project, &flavor, &image, grouped, ha),
                    project,
                    instance_id,
                    operation_id: op,
                }
            }),
        (
            project(),
            proptest::collection::vec(id(), 0..4),
            id(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(project, ids, flavor, grouped, ha)| Command::CreateInstances {
                    spec: spec(&project, &flavor, "a", grouped, ha),
                    project,
                    instances: ids
                        .into_iter()
                        .map(|instance_id| NewInstance {
                            operation_id: format!("op-{instance_id}"),
                            instance_id,
                        })
                        .collect(),
                }
            ),
        (instance(), node())
            .prop_map(|(instance, node)| Command::RestartInstanceElsewhere { instance, node }),
        instance().prop_map(|resource| Command::RecordRefusal {
            resource,
            reason: "refused".into(),
        }),
        (instance(), node(), 0u64..6).prop_map(|(instance, node, g)| {
            Command::ScheduleInstance {
                instance,
                node,
                expected_generation: g,
            }
        }),
        (instance(), instance_state()).prop_map(|(instance, state)| {
            Command::SetInstanceState {
                instance,
                state,
                reason: String::new(),
                expected_generation: None,
            }
        }),
        (instance(), id()).prop_map(|(instance, operation_id)| Command::DeleteInstance {
            instance,
            operation_id,
        }),
        instance().prop_map(|instance| Command::PurgeInstance { instance }),
        id().prop_map(|node_id| Command::RegisterNode {
            node_id,
            address: "127.0.0.1:1".into(),
            capacity: Resources {
                vcpus: 8,
                memory_mib: 8192,
                disk_gib: 100,
            },
            labels: BTreeMap::new(),
        }),
        (
            node(),
            prop_oneof![
                Just(NodeState::Up),
                Just(NodeState::Draining),
                Just(NodeState::Down)
            ]
        )
            .prop_map(|(node, state)| Command::SetNodeState { node, state }),
        node().prop_map(|node| Command::DeregisterNode { node }),
        node().prop_map(|node| Command::RemoveNode { node }),
        (id(), instance(), node()).prop_map(|(migration_id, instance, target)| {
            Command::CreateMigration {
                migration_id,
                instance,
                target,
                max_downtime_ms: 0,
                cause: String::new(),
            }
        }),
        (
            id(),
            prop_oneof![
                Just(MigrationState::Running),
                Just(MigrationState::Completed),
                Just(MigrationState::Failed),
                Just(MigrationState::Cancelled),
                Just(MigrationState::Switching),
                Just(MigrationState::InDoubt)
            ]
        )
            .prop_map(|(m, state)| Command::SetMigrationState {
                migration: format!("migrations/{m}"),
                state,
                bytes_copied: 0,
                reason: String::new(),
            }),
        (id(), node()).prop_map(|(m, node)| Command::SwitchMigration {
            migration: format!("migrations/{m}"),
            node,
            progress: None,
        }),
        (id(), any::<u8>()).prop_map(|(key, v)| Command::KvPut {
            key,
            value: vec![v]
        }),
        (id(), 0u64..20, any::<Option<u8>>()).prop_map(|(key, expected_version, v)| {
            Command::KvCas {
                key,
                expected_version,
                value: v.map(|v| vec![v]),
            }
        }),
    ]
}

/// A log: envelopes with the term each was committed in.
fn log() -> impl Strategy<Value = Vec<(Envelope, u64)>> {
    proptest::collection::vec(
        (
            command(),
            0u64..1000,
            proptest::option::of(id()),
            proptest::option::of(1u64..3),
            1u64..3,
        ),
        0..200,
    )
    .prop_map(|entries| {
        let mut time = 0;
        setup()
            .into_iter()
            .map(|c| (c, 0, None, None, 1))
            .chain(entries)
            .enumerate()
            .map(|(i, (mut command, dt, request_id, fence_term, term))| {
                time += dt;
                // Operation ids must be fresh for a create or delete to work.
                if let Command::CreateInstance { operation_id, .. }
                | Command::DeleteInstance { operation_id, .. } = &mut command
                    && operation_id != "Bad"
                {
                    *operation_id = format!("op{i}");
                }
                if let Command::CreateInstances { instances, .. } = &mut command {
                    for (k, n) in instances.iter_mut().enumerate() {
                        n.operation_id = format!("op{i}-{k}");
                    }
                }
                (
                    Envelope {
                        time,
                        actor: "test".into(),
                        request_id,
                        fence_term,
                        command,
                        origin: None,
                    },
                    term,
                )
            })
            .collect()
    })
}

/// Commands that start every log so random commands mostly hit existing
/// resources.
fn setup() -> Vec<Command> {
    let mut out = Vec::new();
    for id in ["a", "b"] {
        out.push(Command::CreateProject {
            project_id: id.into(),
            display_name: String::new(),
            quota: None,
        });
        out.push(Command::CreateFlavor {
            flavor_id: id.into(),
            resources: Resources {
                vcpus: 2,
                memory_mib: 1024,
                disk_gib: 10,
            },
        });
        out.push(Command::CreateImage {
            image_id: id.into(),
            format: "raw".into(),
            size_bytes: 1,
            checksum: String::new(),
            state: ImageState::Active,
        });
        out.push(Command::RegisterNode {
            node_id: id.into(),
            address: String::new(),
            capacity: Resources::default(),
            labels: BTreeMap::new(),
        });
    }
    out
}

fn replay(state: &mut State, log: &[(Envelope, u64)]) -> Vec<String> {
    log.iter()
        .map(|(env, term)| format!("{:?}", apply(state, env, *term)))
        .collect()
}

fn check_invariants(state: &State) -> Result<(), TestCaseError> {
    // The by-node index is what the instances say.
    prop_assert_eq!(&state.placed, &state.placed_from_instances());
    prop_assert_eq!(
        &state.open_operations,
        &state.open_operations_from_operations()
    );
    prop_assert_eq!(
        &state.open_migrations,
        &state.open_migrations_from_migrations()
    );
    let mut count: BTreeMap<&str, u64> = BTreeMap::new();
    let mut usage: BTreeMap<&str, Resources> = BTreeMap::new();
    let mut allocated: BTreeMap<&str, Resources> = BTreeMap::new();
    for (key, inst) in &state.instances {
        prop_assert_eq!(key, &inst.name);
        let project = nephele_state::names::project_of(key).unwrap();
        prop_assert!(state.projects.contains_key(project), "orphan {}", key);
        *count.entry(project).or_default() += 1;
        let u = usage.entry(project).or_default();
        *u = u.plus(inst.resources);
        if let Some(n) = &inst.node {
            prop_assert!(state.nodes.contains_key(n), "{} on unknown {}", key, n);
            let a = allocated.entry(n).or_default();
            *a = a.plus(inst.resources);
        }
        if inst.state == InstanceState::Pending {
            prop_assert!(inst.node.is_none());
        }
    }
    for m in state.migrations.values() {
        if !m.state.is_final()
            && let Some(inst) = state.instances.get(&m.instance)
        {
            let a = allocated.entry(&m.target).or_default();
            *a = a.plus(inst.resources);
        }
    }
    for (name, p) in &state.projects {
        let c = count.get(name.as_str()).copied().unwrap_or(0);
        let u = usage.get(name.as_str()).copied().unwrap_or_default();
        prop_assert_eq!(p.instance_count, c);
        prop_assert_eq!(p.usage, u);
        // Quota may be lowered below usage by an operator, but a create never
        // exceeds it: checked in `creates_respect_quota`.
    }
    for (name, n) in &state.nodes {
        let a = allocated.get(name.as_str()).copied().unwrap_or_default();
        prop_assert_eq!(n.allocated, a, "allocation of {}", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn replay_is_deterministic(log in log()) {
        let mut a = State::default();
        let mut b = State::default();
        let ra = replay(&mut a, &log);
        let rb = replay(&mut b, &log);
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(encode_snapshot(&a), encode_snapshot(&b));
        prop_assert_eq!(a.applied, u64::try_from(log.len()).unwrap());
    }

    #[test]
    fn snapshot_then_replay_equals_full_replay(log in log(), cut in 0usize..120) {
        let cut = cut.min(log.len());
        let mut full = State::default();
        let full_answers = replay(&mut full, &log);

        let mut head = State::default();
        let mut answers = replay(&mut head, &log[..cut]);
        let mut restored = decode_snapshot(&encode_snapshot(&head)).unwrap();
        prop_assert_eq!(&restored, &head);
        answers.extend(replay(&mut restored, &log[cut..]));
        prop_assert_eq!(answers, full_answers);
        prop_assert_eq!(restored, full);
    }

    #[test]
    fn invariants_hold_after_every_command(log in log()) {
        let mut s = State::default();
        for (env, term) in &log {
            let before = s.clone();
            let created = match &env.command {
                Command::CreateInstance { project, .. }
                | Command::CreateInstances { project, .. } => Some(project.clone()),
                _ => None,
            };
            let out = apply(&mut s, env, *term);
            check_invariants(&s)?;
            if out.is_err() {
                // A refused command changes nothing but the counter and clock.
                let mut expected = before.clone();
                expected.applied = s.applied;
                expected.now = s.now;
                expected.requests = s.requests.clone();
                expected.request_order = s.request_order.clone();
                prop_assert_eq!(&s, &expected);
            }
            if let (Some(project), Ok(_)) = (created, &out) {
                // A create never takes a project beyond its quota (an
                // operator may still lower a quota below current usage).
                let p = &s.projects[&project];
                prop_assert!(p.instance_count <= p.quota.instances);
                prop_assert!(p.usage.fits_in(p.quota.resources));
            }
        }
    }

    #[test]
    fn request_ids_make_commands_idempotent(log in log()) {
        let mut s = State::default();
        for (env, term) in &log {
            let first = apply(&mut s, env, *term);
            if env.request_id.is_some() && first.is_ok() {
                let again = apply(&mut s, env, *term);
                prop_assert_eq!(first, again);
            }
        }
    }
}
