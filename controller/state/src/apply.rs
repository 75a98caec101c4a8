//! `apply`: validates one [`Envelope`] against the [`State`] and changes it.
//! Deterministic: the outcome depends only on the state, the envelope and the
//! log term, never on a clock, randomness or iteration order of hash maps.

use thiserror::Error;

use crate::codec;
use crate::command::{Command, Envelope, InstanceSpec, NewInstance, Response};
use crate::model::{
    AuditRecord, Event, Flavor, Image, Instance, InstanceState, JoinToken, KvEntry, Migration,
    MigrationProgress, MigrationState, Node, NodeMember, NodeState, Operation, Project,
    RememberedRequest, Resources, ServerGroup, State, Token, User,
};
use crate::names::{self, NameError};

/// Newest events kept in the state; older ones are dropped.
pub const MAX_EVENTS: usize = 1000;
/// Audit records kept in the state (the oldest are dropped first).
pub const MAX_AUDIT_RECORDS: usize = 10_000;
/// How long an answered `request_id` is remembered (24 hours).
pub const REQUEST_ID_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Longest key in the key-value area.
pub const MAX_KV_KEY_LEN: usize = 1024;
/// Largest value in the key-value area.
pub const MAX_KV_VALUE_LEN: usize = 1 << 20;
/// Longest free-text field (display names, reasons, messages).
pub const MAX_TEXT_LEN: usize = 4096;
/// Largest CA certificate [`Command::SetClusterCa`] takes, PEM bytes.
pub const MAX_CA_CERT_LEN: usize = 16 << 10;
/// Largest sealed CA key [`Command::SetClusterCa`] takes.
pub const MAX_SEALED_KEY_LEN: usize = 4 << 10;
/// Most instances one [`Command::CreateInstances`] makes.
pub const MAX_BATCH_CREATE: usize = 100;
/// Longest graceful stop a [`Command::BeginInstanceAction`] may ask for
/// (one hour), ms.
pub const MAX_STOP_TIMEOUT_MS: u64 = 3600 * 1000;

/// Why a command was refused. A refused command leaves the state unchanged
/// except for the applied counter and the clock.
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum ApplyError {
    /// A name or id breaks the naming rules.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A field has a value that can never be accepted.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The resource does not exist.
    #[error("{name} does not exist")]
    NotFound {
        /// The missing resource.
        name: String,
    },
    /// A resource with that name already exists.
    #[error("{name} already exists")]
    AlreadyExists {
        /// The existing resource.
        name: String,
    },
    /// The project quota does not allow it.
    #[error("quota of {project} exceeded: {detail}")]
    QuotaExceeded {
        /// The project.
        project: String,
        /// Which limit.
        detail: String,
    },
    /// The lifecycle does not allow that state change.
    #[error("{name} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The resource.
        name: String,
        /// Its current state.
        from: String,
        /// The refused state.
        to: String,
    },
    /// The resource is not in a state that allows the command.
    #[error("{name}: {reason}")]
    FailedPrecondition {
        /// The resource.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A compare-and-set on a generation or version lost.
    #[error("{name} is at version {actual}, not the expected {expected}")]
    VersionMismatch {
        /// The resource or key.
        name: String,
        /// What the writer expected.
        expected: u64,
        /// What it is.
        actual: u64,
    },
    /// The request id was already used for a different command.
    #[error("request id {request_id:?} was already used for a different request")]
    RequestIdReused {
        /// The id.
        request_id: String,
    },
    /// The proposer's leadership term is over.
    #[error("the command was fenced to term {fence_term} but committed in term {term}")]
    Fenced {
        /// Term the proposer led in.
        fence_term: u64,
        /// Term the command was committed in.
        term: u64,
    },
}

impl From<NameError> for ApplyError {
    fn from(e: NameError) -> Self {
        ApplyError::InvalidName(e.to_string())
    }
}

/// Applies one envelope, committed in raft term `term`, to `state`. A
/// person's call (an envelope with an [`crate::command::Origin`]) goes into
/// the audit trail with its result, whether it changed anything or not.
pub fn apply(state: &mut State, env: &Envelope, term: u64) -> Result<Response, ApplyError> {
    let result = apply_envelope(state, env, term);
    if let Some(origin) = &env.origin {
        let outcome = match (&env.command, &result) {
            (
                Command::RecordDenial { reason, .. } | Command::RecordRefusal { reason, .. },
                Ok(_),
            ) => reason.clone(),
            (_, Ok(_)) => "ok".to_owned(),
            (_, Err(e)) => e.to_string(),
        };
        audit(state, env, origin, outcome);
    }
    result
}

/// Appends one record to the audit trail, every text cut to
/// [`MAX_TEXT_LEN`] (an envelope is made by a controller, but its texts
/// come partly from callers).
fn audit(state: &mut State, env: &Envelope, origin: &crate::command::Origin, result: String) {
    state.next_audit_seq += 1;
    state.audit.push_back(AuditRecord {
        seq: state.next_audit_seq,
        time: state.now,
        actor: cut(&env.actor),
        peer: cut(&origin.peer),
        rpc: cut(&origin.rpc),
        resource: cut(&env.command.target()),
        result: cut(&result),
    });
    while state.audit.len() > MAX_AUDIT_RECORDS {
        state.audit.pop_front();
    }
}

fn apply_envelope(state: &mut State, env: &Envelope, term: u64) -> Result<Response, ApplyError> {
    state.applied += 1;
    state.now = state.now.max(env.time);
    expire_requests(state);

    if let Some(fence_term) = env.fence_term
        && fence_term != term
    {
        return Err(ApplyError::Fenced { fence_term, term });
    }
    let fingerprint = match &env.request_id {
        Some(id) => {
            if id.is_empty() || id.len() > 128 {
                return Err(ApplyError::InvalidArgument(
                    "a request id must be 1 to 128 bytes long".into(),
                ));
            }
            let fp = codec::encode_command(&env.command);
            if let Some(seen) = state.requests.get(id) {
                if seen.command == fp {
                    return Ok(seen.response.clone());
                }
                return Err(ApplyError::RequestIdReused {
                    request_id: id.clone(),
                });
            }
            Some(fp)
        }
        None => None,
    };

    let response = match apply_command(state, env) {
        Ok(r) => r,
        Err(e) => {
            record_refusal(state, env, &e);
            return Err(e);
        }
    };

    if let (Some(id), Some(command)) = (&env.request_id, fingerprint) {
        state.requests.insert(
            id.clone(),
            RememberedRequest {
                time: state.now,
                command,
                response: response.clone(),
            },
        );
        state.request_order.push_back((state.now, id.clone()));
    }
    Ok(response)
}

/// Records a person's refused request in the audit trail (`request.refused`
/// on the resource it was about, with the reason). What the control loops
/// and nodes are refused is routine (a stale placement, a late report) and
/// is only logged by them.
fn record_refusal(state: &mut State, env: &Envelope, error: &ApplyError) {
    if !env.actor.starts_with("users/") || env.actor.len() > MAX_TEXT_LEN {
        return;
    }
    let resource = cut(&env.command.target());
    let message = cut(&error.to_string());
    event(state, &env.actor, &resource, "request.refused", message);
}

/// `text`, cut to at most [`MAX_TEXT_LEN`] bytes on a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn expire_requests(state: &mut State) {
    let horizon = state.now.saturating_sub(REQUEST_ID_RETENTION_MS);
    while let Some((time, _)) = state.request_order.front() {
        if *time >= horizon {
            break;
        }
        if let Some((_, id)) = state.request_order.pop_front() {
            state.requests.remove(&id);
        }
    }
}

fn text(field: &str, value: &str) -> Result<(), ApplyError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(ApplyError::InvalidArgument(format!(
            "{field} is longer than {MAX_TEXT_LEN} bytes"
        )));
    }
    Ok(())
}

fn event(state: &mut State, actor: &str, resource: &str, kind: &str, message: String) {
    state.next_event_seq += 1;
    state.events.push_back(Event {
        seq: state.next_event_seq,
        time: state.now,
        actor: actor.to_owned(),
        resource: resource.to_owned(),
        kind: kind.to_owned(),
        message,
    });
    while state.events.len() > MAX_EVENTS {
        state.events.pop_front();
    }
}

/// Inserts a new image (both ways of creating one), refusing a taken
/// name.
fn create_image(state: &mut State, actor: &str, image: Image) -> Result<Response, ApplyError> {
    let id = image.name.strip_prefix("images/").unwrap_or_default();
    names::validate_id(id)?;
    text("format", &image.format)?;
    text("checksum", &image.checksum)?;
    let name = image.name.clone();
    if state.images.contains_key(&name) {
        return Err(ApplyError::AlreadyExists { name });
    }
    state.images.insert(name.clone(), image.clone());
    event(state, actor, &name, "image.created", String::new());
    Ok(Response::Image(image))
}

/// Deletes a resource that nothing else holds on to: checks the name
/// against `pattern`, removes it from its map, records `<kind>.deleted`.
fn delete_plain<V>(
    state: &mut State,
    actor: &str,
    name: &str,
    pattern: &'static str,
    kind: &str,
    map: fn(&mut State) -> &mut std::collections::BTreeMap<String, V>,
) -> Result<Response, ApplyError> {
    names::parse(name, pattern)?;
    if map(state).remove(name).is_none() {
        return Err(not_found(name));
    }
    event(
        state,
        actor,
        name,
        &format!("{kind}.deleted"),
        String::new(),
    );
    Ok(Response::Deleted {
        name: name.to_owned(),
    })
}

fn not_found(name: &str) -> ApplyError {
    ApplyError::NotFound {
        name: name.to_owned(),
    }
}

/// The refusal of anything a removed node tries.
fn removed(node: &str) -> ApplyError {
    precondition(
        node,
        "the node was removed from the cluster (neph node remove); its name cannot be used again",
    )
}

fn precondition(name: &str, reason: impl Into<String>) -> ApplyError {
    ApplyError::FailedPrecondition {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn new_operation(
    state: &mut State,
    operation_id: &str,
    target: &str,
    verb: &str,
) -> Result<Operation, ApplyError> {
    names::validate_id(operation_id)?;
    let name = format!("operations/{operation_id}");
    if state.operations.contains_key(&name) {
        return Err(ApplyError::AlreadyExists { name });
    }
    Ok(insert_operation(state, name, target, verb))
}

/// Opens the operation `name`, which the caller checked is free.
fn insert_operation(state: &mut State, name: String, target: &str, verb: &str) -> Operation {
    let op = Operation {
        name: name.clone(),
        target: target.to_owned(),
        verb: verb.to_owned(),
        done: false,
        error: None,
        create_time: state.now,
        update_time: state.now,
    };
    state
        .open_operations
        .entry(target.to_owned())
        .or_default()
        .insert(name.clone());
    state.operations.insert(name, op.clone());
    op
}

/// Finishes every open operation on `target` whose verb is in `verbs`.
fn finish_operations(state: &mut State, target: &str, verbs: &[&str], error: Option<&str>) {
    let now = state.now;
    let Some(open) = state.open_operations.get(target) else {
        return;
    };
    let open: Vec<String> = open.iter().cloned().collect();
    for name in open {
        let Some(op) = state.operations.get_mut(&name) else {
            continue;
        };
        if !op.done && verbs.contains(&op.verb.as_str()) {
            op.done = true;
            op.error = error.map(str::to_owned);
            op.update_time = now;
            state.close_operation(target, &name);
        }
    }
}

/// Gives back what a placed instance holds on its node.
fn release_node(state: &mut State, node: &Option<String>, resources: Resources) {
    if let Some(node) = node
        && let Some(n) = state.nodes.get_mut(node)
    {
        n.allocated = n.allocated.minus(resources);
    }
}

/// Default downtime budget of a migration, ms.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 50;

/// Moves a migration to `to`; a final state ends it: `Completed` moves the
/// instance to the target and releases the source, `Failed`/`Cancelled`
/// release the target; either way the instance is `RUNNING` again.
fn finish_migration(
    state: &mut State,
    actor: &str,
    now: u64,
    migration: &str,
    to: MigrationState,
    bytes_copied: u64,
    reason: &str,
) -> Result<Migration, ApplyError> {
    let m = state
        .migrations
        .get(migration)
        .ok_or_else(|| not_found(migration))?
        .clone();
    if to.is_final() {
        let resources = state
            .instances
            .get(&m.instance)
            .map(|i| i.resources)
            .unwrap_or_default();
        let released = if to == MigrationState::Completed {
            &m.source
        } else {
            &m.target
        };
        release_node(state, &Some(released.clone()), resources);
        let mut resumed = false;
        if to == MigrationState::Completed {
            state.set_node(&m.instance, Some(&m.target));
        }
        if let Some(i) = state.instances.get_mut(&m.instance) {
            if i.state == InstanceState::Migrating {
                i.state = InstanceState::Running;
                resumed = true;
            }
            i.generation += 1;
            i.update_time = now;
        }
        if resumed {
            let on = if to == MigrationState::Completed {
                &m.target
            } else {
                &m.source
            };
            event(
                state,
                actor,
                &m.instance,
                "instance.state_changed",
                format!("MIGRATING -> RUNNING: {migration} {to:?}, on {on}"),
            );
        }
    }
    if to.is_final() && state.open_migrations.get(&m.instance) == Some(&m.name) {
        state.open_migrations.remove(&m.instance);
    }
    let m = state
        .migrations
        .get_mut(migration)
        .ok_or_else(|| not_found(migration))?;
    m.state = to;
    // A report that did not count (a target's, a reconciler's) keeps what
    // the source counted.
    m.bytes_copied = m.bytes_copied.max(bytes_copied);
    m.reason = reason.to_owned();
    m.update_time = now;
    let m = m.clone();
    if to.is_final() {
        let msg = if reason.is_empty() {
            format!("{to:?}")
        } else {
            format!("{to:?}: {reason}")
        };
        event(state, actor, migration, "migration.finished", msg);
    }
    Ok(m)
}

fn check_key(key: &str) -> Result<(), ApplyError> {
    if key.is_empty() || key.len() > MAX_KV_KEY_LEN {
        return Err(ApplyError::InvalidArgument(format!(
            "a key must be 1 to {MAX_KV_KEY_LEN} bytes long"
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), ApplyError> {
    if value.len() > MAX_KV_VALUE_LEN {
        return Err(ApplyError::InvalidArgument(format!(
            "a value must be at most {MAX_KV_VALUE_LEN} bytes long"
        )));
    }
    Ok(())
}

/// Creates `new` instances of `project` alike, all or none: everything is
/// checked (names, references, duplicates, quota for all of them) before
/// anything changes, so a refusal leaves the state as it was.
fn create_instances(
    state: &mut State,
    actor: &str,
    project: &str,
    spec: &InstanceSpec,
    new: &[NewInstance],
) -> Result<Vec<(Instance, Operation)>, ApplyError> {
    names::parse(project, names::PROJECT)?;
    names::parse(&spec.flavor, names::FLAVOR)?;
    names::parse(&spec.image, names::IMAGE)?;
    for (k, v) in &spec.labels {
        text("label", k)?;
        text("label", v)?;
    }
    if new.is_empty() || new.len() > MAX_BATCH_CREATE {
        return Err(ApplyError::InvalidArgument(format!(
            "a create makes 1 to {MAX_BATCH_CREATE} instances, not {}",
            new.len()
        )));
    }
    let p = state
        .projects
        .get(project)
        .ok_or_else(|| not_found(project))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut planned = Vec::with_capacity(new.len());
    for n in new {
        names::validate_id(&n.instance_id)?;
        names::validate_id(&n.operation_id)?;
        let name = format!("{project}/instances/{}", n.instance_id);
        let op = format!("operations/{}", n.operation_id);
        for key in [&name, &op] {
            if !seen.insert(key.clone()) {
                return Err(ApplyError::InvalidArgument(format!(
                    "{key} is named twice in one create"
                )));
            }
        }
        if state.instances.contains_key(&name) {
            return Err(ApplyError::AlreadyExists { name });
        }
        if state.operations.contains_key(&op) {
            return Err(ApplyError::AlreadyExists { name: op });
        }
        planned.push((name, op));
    }
    let resources = state
        .flavors
        .get(&spec.flavor)
        .ok_or_else(|| not_found(&spec.flavor))?
        .resources;
    let img = state
        .images
        .get(&spec.image)
        .ok_or_else(|| not_found(&spec.image))?;
    if img.state != crate::model::ImageState::Active {
        return Err(precondition(&spec.image, "the image is not active"));
    }
    if let Some(g) = &spec.server_group {
        names::parse(g, names::SERVER_GROUP)?;
        if names::project_of(g) != Some(project) {
            return Err(ApplyError::InvalidArgument(format!(
                "server group {g} is not in {project}"
            )));
        }
        if !state.server_groups.contains_key(g) {
            return Err(not_found(g));
        }
    }
    let count = u64::try_from(planned.len()).unwrap_or(u64::MAX);
    if p.instance_count.saturating_add(count) > p.quota.instances {
        return Err(ApplyError::QuotaExceeded {
            project: project.to_owned(),
            detail: format!("at most {} instances", p.quota.instances),
        });
    }
    let usage = (0..count).fold(p.usage, |u, _| u.plus(resources));
    if !usage.fits_in(p.quota.resources) {
        return Err(ApplyError::QuotaExceeded {
            project: project.to_owned(),
            detail: format!("would use {usage:?} of {:?}", p.quota.resources),
        });
    }

    // Everything is checked: from here on nothing fails.
    let now = state.now;
    if let Some(p) = state.projects.get_mut(project) {
        p.instance_count += count;
        p.usage = usage;
    }
    let mut created = Vec::with_capacity(planned.len());
    for (name, op_name) in planned {
        let op = insert_operation(state, op_name, &name, "create");
        if let Some(g) = &spec.server_group
            && let Some(g) = state.server_groups.get_mut(g)
        {
            g.members.push(name.clone());
        }
        let instance = Instance {
            name: name.clone(),
            flavor: spec.flavor.clone(),
            resources,
            image: spec.image.clone(),
            server_group: spec.server_group.clone(),
            state: InstanceState::Pending,
            reason: String::new(),
            node: None,
            labels: spec.labels.clone(),
            generation: 1,
            create_time: now,
            update_time: now,
            ha: spec.ha,
            boot_count: 1,
            stop_timeout_ms: None,
        };
        state.instances.insert(name.clone(), instance.clone());
        let detail = if spec.ha { "ha" } else { "" };
        event(state, actor, &name, "instance.created", detail.to_owned());
        created.push((instance, op));
    }
    Ok(created)
}

fn apply_command(state: &mut State, env: &Envelope) -> Result<Response, ApplyError> {
    let now = state.now;
    let actor = env.actor.as_str();
    text("actor", actor)?;
    match &env.command {
        Command::Noop => Ok(Response::Done),

        Command::CreateProject {
            project_id,
            display_name,
            quota,
        } => {
            names::validate_id(project_id)?;
            text("display_name", display_name)?;
            let name = format!("projects/{project_id}");
            if state.projects.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let project = Project {
                name: name.clone(),
                display_name: display_name.clone(),
                quota: quota.unwrap_or_default(),
                instance_count: 0,
                usage: Resources::default(),
                create_time: now,
            };
            state.projects.insert(name.clone(), project.clone());
            event(state, actor, &name, "project.created", String::new());
            Ok(Response::Project(project))
        }
        Command::SetProjectQuota { project, quota } => {
            names::parse(project, names::PROJECT)?;
            let p = state
                .projects
                .get_mut(project)
                .ok_or_else(|| not_found(project))?;
            p.quota = quota.applied_to(p.quota);
            let q = p.quota;
            let p = p.clone();
            event(
                state,
                actor,
                project,
                "project.quota_changed",
                format!(
                    "instances {}, vcpus {}, memory {} MiB, disk {} GiB",
                    q.instances, q.resources.vcpus, q.resources.memory_mib, q.resources.disk_gib
                ),
            );
            Ok(Response::Project(p))
        }
        Command::DeleteProject { project } => {
            names::parse(project, names::PROJECT)?;
            if !state.projects.contains_key(project) {
                return Err(not_found(project));
            }
            let prefix = format!("{project}/");
            let busy = state
                .instances
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix))
                || state
                    .server_groups
                    .range(prefix.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&prefix));
            if busy {
                return Err(precondition(
                    project,
                    "the project still holds instances or server groups",
                ));
            }
            state.projects.remove(project);
            for user in state.users.values_mut() {
                user.roles.remove(project);
            }
            event(state, actor, project, "project.deleted", String::new());
            Ok(Response::Deleted {
                name: project.clone(),
            })
        }

        Command::CreateUser {
            user_id,
            display_name,
            operator,
        } => {
            names::validate_id(user_id)?;
            text("display_name", display_name)?;
            let name = format!("users/{user_id}");
            if state.users.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let user = User {
                name: name.clone(),
                display_name: display_name.clone(),
                operator: *operator,
                roles: Default::default(),
                create_time: now,
            };
            state.users.insert(name.clone(), user.clone());
            event(state, actor, &name, "user.created", String::new());
            Ok(Response::User(user))
        }
        Command::DeleteUser { user } => {
            names::parse(user, names::USER)?;
            if state.users.remove(user).is_none() {
                return Err(not_found(user));
            }
            let prefix = format!("{user}/tokens/");
            state.tokens.retain(|k, _| !k.starts_with(&prefix));
            event(state, actor, user, "user.deleted", String::new());
            Ok(Response::Deleted { name: user.clone() })
        }
        Command::SetRole {
            user,
            project,
            role,
        } => {
            names::parse(user, names::USER)?;
            names::parse(project, names::PROJECT)?;
            if !state.projects.contains_key(project) {
                return Err(not_found(project));
            }
            let u = state.users.get_mut(user).ok_or_else(|| not_found(user))?;
            match role {
                Some(r) => {
                    u.roles.insert(project.clone(), *r);
                }
                None => {
                    u.roles.remove(project);
                }
            }
            let u = u.clone();
            event(
                state,
                actor,
                user,
                "user.role_changed",
                format!("{project}: {role:?}"),
            );
            Ok(Response::User(u))
        }
        Command::CreateToken {
            user,
            token_id,
            secret_hash,
            expire_time,
        } => {
            names::parse(user, names::USER)?;
            names::validate_id(token_id)?;
            if secret_hash.is_empty() || secret_hash.len() > 256 {
                return Err(ApplyError::InvalidArgument(
                    "a token secret hash must be 1 to 256 bytes long".into(),
                ));
            }
            if !state.users.contains_key(user) {
                return Err(not_found(user));
            }
            let name = format!("{user}/tokens/{token_id}");
            if state.tokens.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let token = Token {
                name: name.clone(),
                secret_hash: secret_hash.clone(),
                expire_time: *expire_time,
                create_time: now,
            };
            state.tokens.insert(name.clone(), token.clone());
            event(state, actor, &name, "token.created", String::new());
            Ok(Response::Token(token))
        }
        Command::DeleteToken { token } => {
            delete_plain(state, actor, token, names::TOKEN, "token", |s| {
                &mut s.tokens
            })
        }

        Command::CreateFlavor {
            flavor_id,
            resources,
        } => {
            names::validate_id(flavor_id)?;
            if resources.vcpus == 0 || resources.memory_mib == 0 {
                return Err(ApplyError::InvalidArgument(
                    "a flavor needs at least one vCPU and some memory".into(),
                ));
            }
            let name = format!("flavors/{flavor_id}");
            if state.flavors.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let flavor = Flavor {
                name: name.clone(),
                resources: *resources,
            };
            state.flavors.insert(name.clone(), flavor.clone());
            event(state, actor, &name, "flavor.created", String::new());
            Ok(Response::Flavor(flavor))
        }
        Command::DeleteFlavor { flavor } => {
            delete_plain(state, actor, flavor, names::FLAVOR, "flavor", |s| {
                &mut s.flavors
            })
        }

        Command::CreateImage {
            image_id,
            format,
            size_bytes,
            checksum,
            state: image_state,
        } => create_image(
            state,
            actor,
            Image {
                name: format!("images/{image_id}"),
                format: format.clone(),
                size_bytes: *size_bytes,
                checksum: checksum.clone(),
                state: *image_state,
                create_time: now,
                files: Vec::new(),
            },
        ),
        Command::CreateUploadedImage {
            image_id,
            format,
            checksum,
            files,
        } => {
            if files.is_empty() {
                return Err(ApplyError::InvalidArgument(
                    "an uploaded image has at least one file".into(),
                ));
            }
            for f in files {
                text("file role", &f.role)?;
                text("file checksum", &f.checksum)?;
            }
            create_image(
                state,
                actor,
                Image {
                    name: format!("images/{image_id}"),
                    format: format.clone(),
                    size_bytes: files
                        .iter()
                        .map(|f| f.size_bytes)
                        .fold(0, u64::saturating_add),
                    checksum: checksum.clone(),
                    state: crate::model::ImageState::Active,
                    create_time: now,
                    files: files.clone(),
                },
            )
        }
        Command::SetImageState {
            image,
            state: image_state,
        } => {
            names::parse(image, names::IMAGE)?;
            let i = state
                .images
                .get_mut(image)
                .ok_or_else(|| not_found(image))?;
            i.state = *image_state;
            let i = i.clone();
            event(
                state,
                actor,
                image,
                "image.state_changed",
                format!("{image_state:?}"),
            );
            Ok(Response::Image(i))
        }
        Command::DeleteImage { image } => {
            delete_plain(state, actor, image, names::IMAGE, "image", |s| {
                &mut s.images
            })
        }

        Command::CreateServerGroup {
            project,
            group_id,
            policy,
            max_per_node,
        } => {
            names::parse(project, names::PROJECT)?;
            names::validate_id(group_id)?;
            match max_per_node {
                Some(0) => {
                    return Err(ApplyError::InvalidArgument(
                        "max_per_node must be at least 1".into(),
                    ));
                }
                Some(_) if *policy != crate::model::GroupPolicy::AntiAffinity => {
                    return Err(ApplyError::InvalidArgument(
                        "max_per_node applies to anti-affinity groups only".into(),
                    ));
                }
                _ => {}
            }
            if !state.projects.contains_key(project) {
                return Err(not_found(project));
            }
            let name = format!("{project}/serverGroups/{group_id}");
            if state.server_groups.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let group = ServerGroup {
                name: name.clone(),
                policy: *policy,
                members: Vec::new(),
                create_time: now,
                max_per_node: *max_per_node,
            };
            state.server_groups.insert(name.clone(), group.clone());
            event(state, actor, &name, "server_group.created", String::new());
            Ok(Response::ServerGroup(group))
        }
        Command::DeleteServerGroup { group } => {
            names::parse(group, names::SERVER_GROUP)?;
            let g = state
                .server_groups
                .get(group)
                .ok_or_else(|| not_found(group))?;
            if !g.members.is_empty() {
                return Err(precondition(group, "the server group still has members"));
            }
            state.server_groups.remove(group);
            event(state, actor, group, "server_group.deleted", String::new());
            Ok(Response::Deleted {
                name: group.clone(),
            })
        }

        Command::CreateInstance {
            project,
            instance_id,
            spec,
            operation_id,
        } => {
            let new = [NewInstance {
                instance_id: instance_id.clone(),
                operation_id: operation_id.clone(),
            }];
            let mut created = create_instances(state, actor, project, spec, &new)?;
            match created.pop() {
                Some((instance, op)) => Ok(Response::Instance {
                    instance,
                    operation: Some(op),
                }),
                None => Err(ApplyError::InvalidArgument("nothing to create".into())),
            }
        }
        Command::CreateInstances {
            project,
            spec,
            instances,
        } => Ok(Response::Created(create_instances(
            state, actor, project, spec, instances,
        )?)),
        Command::ScheduleInstance {
            instance,
            node,
            expected_generation,
        } => {
            names::parse(instance, names::INSTANCE)?;
            names::parse(node, names::NODE)?;
            let n = state.nodes.get(node).ok_or_else(|| not_found(node))?;
            if n.state != NodeState::Up {
                return Err(precondition(node, "the node is not up"));
            }
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if i.generation != *expected_generation {
                return Err(ApplyError::VersionMismatch {
                    name: instance.clone(),
                    expected: *expected_generation,
                    actual: i.generation,
                });
            }
            if !i.state.can_become(InstanceState::Scheduled) {
                return Err(ApplyError::InvalidTransition {
                    name: instance.clone(),
                    from: i.state.to_string(),
                    to: InstanceState::Scheduled.to_string(),
                });
            }
            let resources = i.resources;
            if let Some(n) = state.nodes.get_mut(node) {
                n.allocated = n.allocated.plus(resources);
            }
            state.set_node(instance, Some(node));
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            i.state = InstanceState::Scheduled;
            i.generation += 1;
            i.update_time = now;
            let i = i.clone();
            event(state, actor, instance, "instance.scheduled", node.clone());
            Ok(Response::Instance {
                instance: i,
                operation: None,
            })
        }
        Command::SetInstanceState {
            instance,
            state: to,
            reason,
            expected_generation,
        } => {
            names::parse(instance, names::INSTANCE)?;
            text("reason", reason)?;
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if let Some(g) = expected_generation
                && *g != i.generation
            {
                return Err(ApplyError::VersionMismatch {
                    name: instance.clone(),
                    expected: *g,
                    actual: i.generation,
                });
            }
            if !i.state.can_become(*to) {
                return Err(ApplyError::InvalidTransition {
                    name: instance.clone(),
                    from: i.state.to_string(),
                    to: to.to_string(),
                });
            }
            if matches!(
                to,
                InstanceState::Starting
                    | InstanceState::Running
                    | InstanceState::Stopping
                    | InstanceState::Migrating
            ) && i.node.is_none()
            {
                return Err(precondition(
                    instance,
                    "the instance is not placed on a node",
                ));
            }
            if i.state == InstanceState::Migrating {
                return Err(precondition(
                    instance,
                    "the instance is migrating; finish or cancel the migration",
                ));
            }
            let (old_node, resources) = (i.node.clone(), i.resources);
            if *to == InstanceState::Pending {
                release_node(state, &old_node, resources);
            }
            if *to == InstanceState::Pending {
                state.set_node(instance, None);
            }
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            let from = i.state;
            i.state = *to;
            i.reason = reason.clone();
            i.generation += 1;
            i.update_time = now;
            let i = i.clone();
            match to {
                InstanceState::Running => {
                    finish_operations(state, instance, &["create", "start", "reboot"], None)
                }
                InstanceState::Stopped => finish_operations(state, instance, &["stop"], None),
                InstanceState::Error => finish_operations(
                    state,
                    instance,
                    &["create", "start", "stop", "reboot", "delete"],
                    Some(reason),
                ),
                _ => {}
            }
            event(
                state,
                actor,
                instance,
                "instance.state_changed",
                format!("{from} -> {to}: {reason}"),
            );
            Ok(Response::Instance {
                instance: i,
                operation: None,
            })
        }
        Command::DeleteInstance {
            instance,
            operation_id,
        } => {
            names::parse(instance, names::INSTANCE)?;
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if i.state == InstanceState::Deleting {
                return Err(precondition(
                    instance,
                    "the instance is already being deleted",
                ));
            }
            if !i.state.can_become(InstanceState::Deleting) {
                return Err(ApplyError::InvalidTransition {
                    name: instance.clone(),
                    from: i.state.to_string(),
                    to: InstanceState::Deleting.to_string(),
                });
            }
            let op = new_operation(state, operation_id, instance, "delete")?;
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            i.state = InstanceState::Deleting;
            i.generation += 1;
            i.update_time = now;
            let i = i.clone();
            event(state, actor, instance, "instance.deleting", String::new());
            Ok(Response::Instance {
                instance: i,
                operation: Some(op),
            })
        }
        Command::PurgeInstance { instance } => {
            names::parse(instance, names::INSTANCE)?;
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if i.state != InstanceState::Deleting {
                return Err(precondition(
                    instance,
                    "only a deleting instance can be purged",
                ));
            }
            let node = state.set_node(instance, None);
            let Some(i) = state.instances.remove(instance) else {
                return Err(not_found(instance));
            };
            release_node(state, &node, i.resources);
            if let Some(project) = names::project_of(instance)
                && let Some(p) = state.projects.get_mut(project)
            {
                p.instance_count = p.instance_count.saturating_sub(1);
                p.usage = p.usage.minus(i.resources);
            }
            if let Some(g) = &i.server_group
                && let Some(g) = state.server_groups.get_mut(g)
            {
                g.members.retain(|m| m != instance);
            }
            finish_operations(
                state,
                instance,
                &["create", "start", "stop", "reboot", "delete"],
                None,
            );
            event(state, actor, instance, "instance.deleted", String::new());
            Ok(Response::Deleted {
                name: instance.clone(),
            })
        }

        Command::RegisterNode {
            node_id,
            address,
            capacity,
            labels,
        } => {
            names::validate_id(node_id)?;
            text("address", address)?;
            for (k, v) in labels {
                text("label", k)?;
                text("label", v)?;
            }
            let name = format!("nodes/{node_id}");
            if state.is_revoked_node(&name) {
                return Err(removed(&name));
            }
            let node = match state.nodes.get_mut(&name) {
                Some(n) => {
                    n.address = address.clone();
                    n.capacity = *capacity;
                    n.labels = labels.clone();
                    n.last_heartbeat = now;
                    if n.state == NodeState::Down {
                        n.state = NodeState::Up;
                    }
                    n.clone()
                }
                None => {
                    let n = Node {
                        name: name.clone(),
                        address: address.clone(),
                        capacity: *capacity,
                        allocated: Resources::default(),
                        labels: labels.clone(),
                        state: NodeState::Up,
                        last_heartbeat: now,
                        create_time: now,
                    };
                    state.nodes.insert(name.clone(), n.clone());
                    n
                }
            };
            event(state, actor, &name, "node.registered", address.clone());
            Ok(Response::Node(node))
        }
        Command::NodeHeartbeat { node } => {
            names::parse(node, names::NODE)?;
            let n = state.nodes.get_mut(node).ok_or_else(|| not_found(node))?;
            n.last_heartbeat = now;
            let revived = n.state == NodeState::Down;
            if revived {
                n.state = NodeState::Up;
            }
            let n = n.clone();
            if revived {
                event(state, actor, node, "node.up", String::new());
            }
            Ok(Response::Node(n))
        }
        Command::SetNodeState {
            node,
            state: node_state,
        } => {
            names::parse(node, names::NODE)?;
            let n = state.nodes.get_mut(node).ok_or_else(|| not_found(node))?;
            n.state = *node_state;
            let n = n.clone();
            event(
                state,
                actor,
                node,
                "node.state_changed",
                format!("{node_state:?}"),
            );
            Ok(Response::Node(n))
        }
        Command::DeregisterNode { node } => {
            names::parse(node, names::NODE)?;
            if !state.nodes.contains_key(node) {
                return Err(not_found(node));
            }
            if state.placed.contains_key(node.as_str())
                || state.unfinished_migrations().any(|m| m.target == *node)
            {
                return Err(precondition(node, "the node still holds instances"));
            }
            state.nodes.remove(node);
            event(state, actor, node, "node.deregistered", String::new());
            Ok(Response::Deleted { name: node.clone() })
        }
        Command::RemoveNode { node } => {
            names::parse(node, names::NODE)?;
            let registered = state.nodes.contains_key(node);
            let member = state.node_members.get(node).cloned();
            if !registered && member.is_none() {
                return Err(not_found(node));
            }
            if member.as_ref().is_some_and(|m| m.revoked.is_some()) {
                return Err(removed(node));
            }
            let holding: Vec<&str> = state.instances_on(node).map(|i| i.name.as_str()).collect();
            if !holding.is_empty() {
                return Err(precondition(
                    node,
                    format!(
                        "instances are placed on it ({}); drain it first (neph node drain), \
                         or delete them",
                        holding.join(", ")
                    ),
                ));
            }
            if state
                .unfinished_migrations()
                .any(|m| m.target == *node || m.source == *node)
            {
                return Err(precondition(
                    node,
                    "a migration to or from it is in progress; wait for it or cancel it",
                ));
            }
            state.nodes.remove(node);
            let id = node.strip_prefix("nodes/").unwrap_or(node);
            state
                .join_tokens
                .retain(|_, t| !(t.used.is_none() && t.node.as_deref() == Some(id)));
            state.node_members.insert(
                node.clone(),
                NodeMember {
                    name: node.clone(),
                    joined: member.and_then(|m| m.joined),
                    revoked: Some(now),
                },
            );
            event(state, actor, node, "node.removed", String::new());
            Ok(Response::Deleted { name: node.clone() })
        }

        Command::CreateMigration {
            migration_id,
            instance,
            target,
            max_downtime_ms,
            cause,
        } => {
            text("cause", cause)?;
            names::validate_id(migration_id)?;
            names::parse(instance, names::INSTANCE)?;
            names::parse(target, names::NODE)?;
            let name = format!("migrations/{migration_id}");
            if state.migrations.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if i.state != InstanceState::Running {
                return Err(precondition(
                    instance,
                    "only a running instance can migrate",
                ));
            }
            let Some(source) = i.node.clone() else {
                return Err(precondition(
                    instance,
                    "the instance is not placed on a node",
                ));
            };
            if source == *target {
                return Err(ApplyError::InvalidArgument(format!(
                    "{instance} already runs on {target}"
                )));
            }
            let t = state.nodes.get(target).ok_or_else(|| not_found(target))?;
            if t.state != NodeState::Up {
                return Err(precondition(target, "the target node is not up"));
            }
            let resources = i.resources;
            if let Some(t) = state.nodes.get_mut(target) {
                t.allocated = t.allocated.plus(resources);
            }
            if let Some(i) = state.instances.get_mut(instance) {
                i.state = InstanceState::Migrating;
                i.generation += 1;
                i.update_time = now;
            }
            let m = Migration {
                name: name.clone(),
                instance: instance.clone(),
                source,
                target: target.clone(),
                state: MigrationState::Queued,
                bytes_copied: 0,
                reason: String::new(),
                create_time: now,
                update_time: now,
                max_downtime_ms: if *max_downtime_ms == 0 {
                    DEFAULT_MAX_DOWNTIME_MS
                } else {
                    *max_downtime_ms
                },
                target_address: String::new(),
                progress: MigrationProgress::default(),
                cause: cause.clone(),
            };
            state.migrations.insert(name.clone(), m.clone());
            state.open_migrations.insert(instance.clone(), name.clone());
            let why = if cause.is_empty() {
                String::new()
            } else {
                format!(": {cause}")
            };
            event(
                state,
                actor,
                &name,
                "migration.created",
                format!("{instance} from {} to {target}{why}", m.source),
            );
            event(
                state,
                actor,
                instance,
                "instance.state_changed",
                format!("RUNNING -> MIGRATING: {name} to {target}"),
            );
            Ok(Response::Migration(m))
        }
        Command::SetMigrationState {
            migration,
            state: to,
            bytes_copied,
            reason,
        } => {
            names::parse(migration, names::MIGRATION)?;
            text("reason", reason)?;
            let m = state
                .migrations
                .get(migration)
                .ok_or_else(|| not_found(migration))?;
            use MigrationState as M;
            if m.state.is_switching() && *to == M::Cancelled {
                return Err(precondition(
                    migration,
                    "the switchover is decided; the migration can no longer be cancelled",
                ));
            }
            // A repeated in-doubt report changes nothing.
            if (m.state, *to) == (M::InDoubt, M::InDoubt) {
                return Ok(Response::Migration(m.clone()));
            }
            let allowed = match (m.state, *to) {
                (from, _) if from.is_final() => false,
                // Only `SwitchMigration` decides a switchover, and only a
                // decided one can complete or be in doubt.
                (_, M::Switching) => false,
                (from, M::Completed | M::InDoubt) => from.is_switching(),
                (M::Queued | M::Running, M::Queued) => false,
                (M::Switching | M::InDoubt, M::Queued | M::Running) => false,
                _ => true,
            };
            if !allowed {
                return Err(ApplyError::InvalidTransition {
                    name: migration.clone(),
                    from: format!("{:?}", m.state),
                    to: format!("{to:?}"),
                });
            }
            let m = finish_migration(state, actor, now, migration, *to, *bytes_copied, reason)?;
            if *to == M::InDoubt {
                event(
                    state,
                    actor,
                    migration,
                    "migration.in_doubt",
                    format!(
                        "the source sent the commit and heard nothing back; {} settles where the VM runs",
                        m.target
                    ),
                );
            }
            Ok(Response::Migration(m))
        }
        Command::UpdateMigration {
            migration,
            node,
            target_address,
            progress,
        } => {
            names::parse(migration, names::MIGRATION)?;
            names::parse(node, names::NODE)?;
            text("target_address", target_address)?;
            let m = state
                .migrations
                .get_mut(migration)
                .ok_or_else(|| not_found(migration))?;
            // The source's last word after the switchover: the figures the
            // VMM measured once the VM ran on the target (the downtime is
            // only known then). Nothing else of a finished migration moves.
            if m.state == MigrationState::Completed
                && *node == m.source
                && target_address.is_empty()
                && let Some(p) = progress
            {
                m.progress = *p;
                m.bytes_copied = m.bytes_copied.max(p.bytes_sent);
                m.update_time = now;
                return Ok(Response::Migration(m.clone()));
            }
            if m.state.is_final() {
                return Err(precondition(
                    migration,
                    format!("the migration is {:?}; stop working on it", m.state),
                ));
            }
            if *node != m.source && *node != m.target {
                return Err(precondition(
                    migration,
                    format!("{node} takes no part in it"),
                ));
            }
            let started = m.state == MigrationState::Queued && !target_address.is_empty();
            if !target_address.is_empty() {
                if *node != m.target {
                    return Err(precondition(
                        migration,
                        "only the target names the address to migrate to",
                    ));
                }
                m.target_address = target_address.clone();
                m.state = MigrationState::Running;
            }
            if let Some(p) = progress {
                m.progress = *p;
                m.bytes_copied = p.bytes_sent;
            }
            m.update_time = now;
            let m = m.clone();
            if started {
                event(
                    state,
                    actor,
                    migration,
                    "migration.started",
                    format!("the target listens on {target_address}"),
                );
            }
            Ok(Response::Migration(m))
        }
        Command::SwitchMigration {
            migration,
            node,
            progress,
        } => {
            names::parse(migration, names::MIGRATION)?;
            let m = state
                .migrations
                .get_mut(migration)
                .ok_or_else(|| not_found(migration))?;
            if *node != m.source {
                return Err(precondition(
                    migration,
                    format!("only its source {} can switch it over", m.source),
                ));
            }
            // Asked again (an answer lost on the way): still yes.
            if m.state.is_switching() || m.state == MigrationState::Completed {
                return Ok(Response::Migration(m.clone()));
            }
            if m.state != MigrationState::Running {
                return Err(precondition(
                    migration,
                    format!(
                        "the migration is {:?}, not running; the source keeps the VM",
                        m.state
                    ),
                ));
            }
            // Decided: from here the target may run the VM once it has the
            // complete state; the source runs it only until it pauses for
            // the last copy, and never again unless this migration fails.
            if let Some(p) = progress {
                m.progress = *p;
                m.bytes_copied = p.bytes_sent;
            }
            m.state = MigrationState::Switching;
            m.update_time = now;
            let m = m.clone();
            event(
                state,
                actor,
                migration,
                "migration.switching",
                format!("the switchover to {} is decided", m.target),
            );
            Ok(Response::Migration(m))
        }
        Command::CreateJoinToken {
            token_id,
            secret_hash,
            expire_time,
            node,
        } => {
            if token_id.is_empty()
                || token_id.len() > 64
                || !token_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(ApplyError::InvalidName(format!(
                    "a join token id is 1 to 64 lowercase hex digits, not {token_id:?}"
                )));
            }
            if secret_hash.is_empty() || secret_hash.len() > 256 {
                return Err(ApplyError::InvalidArgument(
                    "a join token secret hash must be 1 to 256 bytes long".into(),
                ));
            }
            if *expire_time <= now {
                return Err(ApplyError::InvalidArgument(
                    "a join token must expire in the future".into(),
                ));
            }
            if let Some(n) = node {
                names::validate_id(n)?;
                let name = format!("nodes/{n}");
                if state.is_revoked_node(&name) {
                    return Err(removed(&name));
                }
            }
            // Spent tokens are of no use any more: keep the state small.
            state
                .join_tokens
                .retain(|_, t| t.used.is_none() && t.expire_time > now);
            let name = format!("joinTokens/{token_id}");
            if state.join_tokens.contains_key(&name) {
                return Err(ApplyError::AlreadyExists { name });
            }
            let token = JoinToken {
                name: name.clone(),
                secret_hash: secret_hash.clone(),
                create_time: now,
                expire_time: *expire_time,
                node: node.clone(),
                used: None,
            };
            state.join_tokens.insert(name.clone(), token.clone());
            event(state, actor, &name, "join_token.created", String::new());
            Ok(Response::JoinToken(token))
        }
        Command::RedeemJoinToken {
            token_id,
            secret_hash,
            node_id,
        } => {
            names::validate_id(node_id)?;
            let name = format!("joinTokens/{token_id}");
            // Unknown and wrong-secret tokens get the same answer.
            let t = state
                .join_tokens
                .get(&name)
                .filter(|t| t.secret_hash == *secret_hash)
                .ok_or_else(|| precondition(&name, "the join token is unknown or invalid"))?;
            if let Some((_, by)) = &t.used {
                return Err(precondition(
                    &name,
                    format!("the join token was already used by {by}"),
                ));
            }
            if now >= t.expire_time {
                return Err(precondition(&name, "the join token expired"));
            }
            if let Some(allowed) = &t.node
                && allowed != node_id
            {
                return Err(precondition(
                    &name,
                    format!("the join token is for node {allowed}, not {node_id}"),
                ));
            }
            let by = format!("nodes/{node_id}");
            if state.is_revoked_node(&by) {
                return Err(removed(&by));
            }
            // A token for any node must not take a known name over: the
            // certificate it gets would pass for that node.
            if t.node.is_none()
                && (state.nodes.contains_key(&by) || state.node_members.contains_key(&by))
            {
                return Err(precondition(
                    &name,
                    format!(
                        "{by} is already a member of the cluster; a join token for a known \
                         node must be made for it (neph node join-token create --node {node_id})"
                    ),
                ));
            }
            let mut t = t.clone();
            t.used = Some((now, by.clone()));
            state.join_tokens.insert(name.clone(), t.clone());
            state.node_members.insert(
                by.clone(),
                NodeMember {
                    name: by.clone(),
                    joined: Some(now),
                    revoked: None,
                },
            );
            event(state, actor, &name, "join_token.used", by);
            Ok(Response::JoinToken(t))
        }
        Command::RenewNodeCertificate { node_id, serial } => {
            names::validate_id(node_id)?;
            if serial.is_empty()
                || serial.len() > 64
                || !serial.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(ApplyError::InvalidArgument(
                    "a certificate serial is 1 to 64 hex digits".into(),
                ));
            }
            let name = format!("nodes/{node_id}");
            match state.node_members.get(&name) {
                Some(m) if m.revoked.is_some() => return Err(removed(&name)),
                Some(m) if m.joined.is_some() => {}
                _ => {
                    return Err(precondition(
                        &name,
                        "the node never joined; it joins with a join token first",
                    ));
                }
            }
            event(
                state,
                actor,
                &name,
                "node.certificate_renewed",
                serial.to_ascii_lowercase(),
            );
            Ok(Response::Done)
        }
        Command::SetClusterCa { ca } => {
            if ca.cluster_id.is_empty() || ca.cluster_id.len() > 64 {
                return Err(ApplyError::InvalidArgument(
                    "a cluster id is 1 to 64 bytes long".into(),
                ));
            }
            if !ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----")
                || ca.cert_pem.len() > MAX_CA_CERT_LEN
            {
                return Err(ApplyError::InvalidArgument(format!(
                    "the CA certificate must be one PEM certificate of at most {MAX_CA_CERT_LEN} bytes"
                )));
            }
            if ca.sealed_key.is_empty() || ca.sealed_key.len() > MAX_SEALED_KEY_LEN {
                return Err(ApplyError::InvalidArgument(format!(
                    "the sealed CA key must be 1 to {MAX_SEALED_KEY_LEN} bytes"
                )));
            }
            match &state.cluster_ca {
                Some(have) if have == ca => Ok(Response::Done),
                Some(_) => Err(precondition(
                    "cluster/ca",
                    "the cluster already has another CA; it is set once, at init",
                )),
                None => {
                    state.cluster_ca = Some(ca.clone());
                    event(state, actor, "cluster/ca", "cluster.ca_set", String::new());
                    Ok(Response::Done)
                }
            }
        }
        Command::BeginInstanceAction {
            instance,
            state: to,
            verb,
            operation_id,
            stop_timeout_ms,
        } => {
            if !matches!(verb.as_str(), "start" | "stop" | "reboot") {
                return Err(ApplyError::InvalidArgument(format!(
                    "an instance action is start, stop or reboot, not {verb:?}"
                )));
            }
            match stop_timeout_ms {
                Some(_) if verb != "stop" => {
                    return Err(ApplyError::InvalidArgument(format!(
                        "only a stop takes a timeout, not a {verb}"
                    )));
                }
                Some(ms) if *ms > MAX_STOP_TIMEOUT_MS => {
                    return Err(ApplyError::InvalidArgument(format!(
                        "a stop timeout is at most {} s, not {} ms",
                        MAX_STOP_TIMEOUT_MS / 1000,
                        ms
                    )));
                }
                _ => {}
            }
            names::validate_id(operation_id)?;
            let op_name = format!("operations/{operation_id}");
            if state.operations.contains_key(&op_name) {
                return Err(ApplyError::AlreadyExists { name: op_name });
            }
            let transition = Envelope {
                time: env.time,
                actor: env.actor.clone(),
                request_id: None,
                fence_term: None,
                command: Command::SetInstanceState {
                    instance: instance.clone(),
                    state: *to,
                    reason: format!("{verb} requested"),
                    expected_generation: None,
                },
                origin: None,
            };
            apply_command(state, &transition)?;
            let op = new_operation(state, operation_id, instance, verb)?;
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            // A start or reboot forgets the last stop's timeout.
            i.stop_timeout_ms = *stop_timeout_ms;
            if verb != "stop" {
                i.boot_count += 1;
            }
            Ok(Response::Instance {
                instance: i.clone(),
                operation: Some(op),
            })
        }
        Command::ResizeInstance {
            instance,
            flavor,
            node_limit,
        } => {
            names::parse(instance, names::INSTANCE)?;
            names::parse(flavor, names::FLAVOR)?;
            let new = state
                .flavors
                .get(flavor)
                .ok_or_else(|| not_found(flavor))?
                .resources;
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if i.state != InstanceState::Stopped {
                return Err(precondition(
                    instance,
                    "only a stopped instance can be resized",
                ));
            }
            let (old, node) = (i.resources, i.node.clone());
            if new.disk_gib < old.disk_gib {
                return Err(precondition(
                    instance,
                    format!(
                        "its disk cannot shrink from {} GiB to {} GiB; pick a flavor with at least {} GiB of disk",
                        old.disk_gib, new.disk_gib, old.disk_gib
                    ),
                ));
            }
            if let (Some(limit), Some(n)) =
                (node_limit, node.as_ref().and_then(|n| state.nodes.get(n)))
            {
                let held = n.allocated.minus(old).plus(new);
                if !new.fits_in(old) && !held.fits_in(*limit) {
                    return Err(precondition(
                        &n.name,
                        format!(
                            "no room for {instance} as {flavor}: it would hold {} vCPUs, {} MiB, {} GiB of at most {} vCPUs, {} MiB, {} GiB",
                            held.vcpus,
                            held.memory_mib,
                            held.disk_gib,
                            limit.vcpus,
                            limit.memory_mib,
                            limit.disk_gib
                        ),
                    ));
                }
            }
            if let Some(project) = names::project_of(instance) {
                let p = state
                    .projects
                    .get(project)
                    .ok_or_else(|| not_found(project))?;
                let usage = p.usage.minus(old).plus(new);
                if !new.fits_in(old) && !usage.fits_in(p.quota.resources) {
                    return Err(ApplyError::QuotaExceeded {
                        project: project.to_owned(),
                        detail: format!("would use {usage:?} of {:?}", p.quota.resources),
                    });
                }
                if let Some(p) = state.projects.get_mut(project) {
                    p.usage = usage;
                }
            }
            release_node(state, &node, old);
            if let Some(n) = node.as_ref().and_then(|n| state.nodes.get_mut(n)) {
                n.allocated = n.allocated.plus(new);
            }
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            i.flavor = flavor.clone();
            i.resources = new;
            i.generation += 1;
            i.update_time = now;
            let i = i.clone();
            event(state, actor, instance, "instance.resized", flavor.clone());
            Ok(Response::Instance {
                instance: i,
                operation: None,
            })
        }
        Command::RestartInstanceElsewhere { instance, node } => {
            names::parse(instance, names::INSTANCE)?;
            let node_id = names::parse(node, names::NODE)?
                .first()
                .map(|s| (*s).to_owned())
                .unwrap_or_default();
            let n = state.nodes.get(node).ok_or_else(|| not_found(node))?;
            if n.state != NodeState::Down {
                return Err(precondition(node, "the node is not down"));
            }
            let i = state
                .instances
                .get(instance)
                .ok_or_else(|| not_found(instance))?;
            if !i.ha {
                return Err(precondition(
                    instance,
                    "the instance is not highly available",
                ));
            }
            if i.node.as_deref() != Some(node.as_str()) {
                return Err(precondition(
                    instance,
                    format!("the instance is not on {node}"),
                ));
            }
            if !matches!(
                i.state,
                InstanceState::Scheduled | InstanceState::Starting | InstanceState::Running
            ) {
                return Err(precondition(
                    instance,
                    format!("a {} instance is not restarted elsewhere", i.state),
                ));
            }
            let resources = i.resources;
            release_node(state, &Some(node.clone()), resources);
            let reason = format!("restarted: node {node_id} fenced");
            state.set_node(instance, None);
            let i = state
                .instances
                .get_mut(instance)
                .ok_or_else(|| not_found(instance))?;
            let from = i.state;
            i.state = InstanceState::Pending;
            i.reason = reason.clone();
            i.generation += 1;
            i.boot_count += 1;
            i.update_time = now;
            let i = i.clone();
            event(
                state,
                actor,
                instance,
                "instance.restarted",
                format!("{reason} ({from} -> PENDING)"),
            );
            Ok(Response::Instance {
                instance: i,
                operation: None,
            })
        }
        Command::RecordRefusal { resource, reason } => {
            text("resource", resource)?;
            text("reason", reason)?;
            event(state, actor, resource, "request.refused", reason.clone());
            Ok(Response::Done)
        }
        Command::RecordDenial { resource, reason } => {
            // The record itself is written by `apply` from the origin.
            text("resource", resource)?;
            text("reason", reason)?;
            Ok(Response::Done)
        }
        Command::FinishOperation { operation, error } => {
            names::parse(operation, names::OPERATION)?;
            if let Some(e) = error {
                text("error", e)?;
            }
            let op = state
                .operations
                .get_mut(operation)
                .ok_or_else(|| not_found(operation))?;
            if op.done {
                return Err(precondition(operation, "the operation already finished"));
            }
            op.done = true;
            op.error = error.clone();
            op.update_time = now;
            let op = op.clone();
            state.close_operation(&op.target, &op.name);
            Ok(Response::Operation(op))
        }

        Command::KvPut { key, value } => {
            check_key(key)?;
            check_value(value)?;
            let version = state.applied;
            state.kv.insert(
                key.clone(),
                KvEntry {
                    value: value.clone(),
                    version,
                },
            );
            Ok(Response::Kv {
                key: key.clone(),
                version,
            })
        }
        Command::KvCas {
            key,
            expected_version,
            value,
        } => {
            check_key(key)?;
            let actual = state.kv.get(key).map_or(0, |e| e.version);
            if actual != *expected_version {
                return Err(ApplyError::VersionMismatch {
                    name: key.clone(),
                    expected: *expected_version,
                    actual,
                });
            }
            let version = match value {
                Some(v) => {
                    check_value(v)?;
                    let version = state.applied;
                    state.kv.insert(
                        key.clone(),
                        KvEntry {
                            value: v.clone(),
                            version,
                        },
                    );
                    version
                }
                None => {
                    state.kv.remove(key);
                    0
                }
            };
            Ok(Response::Kv {
                key: key.clone(),
                version,
            })
        }
        Command::KvDelete { key } => {
            check_key(key)?;
            state.kv.remove(key);
            Ok(Response::Kv {
                key: key.clone(),
                version: 0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ImageState, Quota};

    fn run(s: &mut State, cmd: Command) -> Result<Response, ApplyError> {
        let t = s.now + 1;
        apply(s, &Envelope::new(t, "test", cmd), 1)
    }

    fn setup() -> State {
        let mut s = State::default();
        run(
            &mut s,
            Command::CreateProject {
                project_id: "p1".into(),
                display_name: "P1".into(),
                quota: Some(Quota {
                    instances: 2,
                    resources: Resources {
                        vcpus: 4,
                        memory_mib: 4096,
                        disk_gib: 100,
                    },
                }),
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::CreateFlavor {
                flavor_id: "small".into(),
                resources: Resources {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_gib: 10,
                },
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::CreateImage {
                image_id: "debian".into(),
                format: "raw".into(),
                size_bytes: 1,
                checksum: String::new(),
                state: ImageState::Active,
            },
        )
        .unwrap();
        for n in ["n1", "n2"] {
            run(
                &mut s,
                Command::RegisterNode {
                    node_id: n.into(),
                    address: "a".into(),
                    capacity: Resources {
                        vcpus: 8,
                        memory_mib: 8192,
                        disk_gib: 100,
                    },
                    labels: Default::default(),
                },
            )
            .unwrap();
        }
        s
    }

    fn create(s: &mut State, id: &str) -> Result<Response, ApplyError> {
        run(
            s,
            Command::CreateInstance {
                project: "projects/p1".into(),
                instance_id: id.into(),
                spec: spec(false),
                operation_id: format!("op-{id}"),
            },
        )
    }

    fn spec(ha: bool) -> InstanceSpec {
        InstanceSpec {
            flavor: "flavors/small".into(),
            image: "images/debian".into(),
            server_group: None,
            labels: Default::default(),
            ha,
        }
    }

    fn new(ids: &[&str]) -> Vec<NewInstance> {
        ids.iter()
            .map(|id| NewInstance {
                instance_id: (*id).into(),
                operation_id: format!("op-{id}"),
            })
            .collect()
    }

    /// Creates `id` (HA or not), schedules it on `node` and runs it.
    fn running(s: &mut State, id: &str, ha: bool, node: &str) -> String {
        let name = format!("projects/p1/instances/{id}");
        run(
            s,
            Command::CreateInstances {
                project: "projects/p1".into(),
                spec: spec(ha),
                instances: new(&[id]),
            },
        )
        .unwrap();
        run(
            s,
            Command::ScheduleInstance {
                instance: name.clone(),
                node: node.into(),
                expected_generation: 1,
            },
        )
        .unwrap();
        set(s, &name, InstanceState::Starting).unwrap();
        set(s, &name, InstanceState::Running).unwrap();
        name
    }

    #[test]
    fn batch_create_is_all_or_nothing() {
        let mut s = setup();
        let batch = |s: &mut State, ids: &[&str]| {
            run(
                s,
                Command::CreateInstances {
                    project: "projects/p1".into(),
                    spec: spec(true),
                    instances: new(ids),
                },
            )
        };
        // Quota is 2 instances: three are refused whole.
        let before = s.clone();
        assert!(matches!(
            batch(&mut s, &["a", "b", "c"]),
            Err(ApplyError::QuotaExceeded { .. })
        ));
        // A name given twice, an invalid name, none at all: refused whole.
        assert!(matches!(
            batch(&mut s, &["a", "a"]),
            Err(ApplyError::InvalidArgument(_))
        ));
        assert!(matches!(
            batch(&mut s, &["a", "B"]),
            Err(ApplyError::InvalidName(_))
        ));
        assert!(matches!(
            batch(&mut s, &[]),
            Err(ApplyError::InvalidArgument(_))
        ));
        // Nothing but the counters moved.
        let mut after = s.clone();
        after.applied = before.applied;
        after.now = before.now;
        assert_eq!(after, before);

        let Response::Created(created) = batch(&mut s, &["a", "b"]).unwrap() else {
            panic!("not a batch answer");
        };
        assert_eq!(created.len(), 2);
        assert!(created.iter().all(|(i, op)| i.ha && op.target == i.name));
        assert_eq!(s.projects["projects/p1"].instance_count, 2);
        assert_eq!(s.projects["projects/p1"].usage.vcpus, 4);
        assert!(s.operations.contains_key("operations/op-b"));
        // One existing name refuses the whole batch.
        run(
            &mut s,
            Command::SetProjectQuota {
                project: "projects/p1".into(),
                quota: Quota {
                    instances: 10,
                    resources: Resources {
                        vcpus: 100,
                        memory_mib: 100_000,
                        disk_gib: 1000,
                    },
                }
                .into(),
            },
        )
        .unwrap();
        let before = s.instances.len();
        assert!(matches!(
            batch(&mut s, &["c", "a"]),
            Err(ApplyError::AlreadyExists { .. })
        ));
        assert_eq!(s.instances.len(), before);
        assert!(!s.operations.contains_key("operations/op-c"));
    }

    #[test]
    fn start_and_reboot_bump_the_boot_count() {
        let mut s = setup();
        let web = running(&mut s, "web", false, "nodes/n1");
        assert!(!s.instances[&web].ha);
        assert_eq!(s.instances[&web].boot_count, 1);
        let action = |verb: &str, to: InstanceState, op: &str| Command::BeginInstanceAction {
            instance: web.clone(),
            state: to,
            verb: verb.into(),
            operation_id: op.into(),
            stop_timeout_ms: None,
        };
        let Response::Instance { instance, .. } =
            run(&mut s, action("reboot", InstanceState::Starting, "r1")).unwrap()
        else {
            panic!("not an instance");
        };
        assert_eq!(instance.boot_count, 2);
        assert_eq!(instance.state, InstanceState::Starting);
        assert!(!s.operations["operations/r1"].done);
        set(&mut s, &web, InstanceState::Running).unwrap();
        assert!(s.operations["operations/r1"].done);
        run(&mut s, action("stop", InstanceState::Stopping, "s1")).unwrap();
        assert_eq!(s.instances[&web].boot_count, 2);
        set(&mut s, &web, InstanceState::Stopped).unwrap();
        run(&mut s, action("start", InstanceState::Starting, "s2")).unwrap();
        assert_eq!(s.instances[&web].boot_count, 3);
        // A refused action bumps nothing.
        assert!(run(&mut s, action("start", InstanceState::Starting, "s3")).is_err());
        assert_eq!(s.instances[&web].boot_count, 3);
        // An instance in ERROR with a placement can be started again.
        set(&mut s, &web, InstanceState::Error).unwrap();
        run(&mut s, action("start", InstanceState::Starting, "s4")).unwrap();
        assert_eq!(s.instances[&web].boot_count, 4);
    }

    #[test]
    fn a_stop_keeps_its_timeout_on_the_instance() {
        let mut s = setup();
        let web = running(&mut s, "web", false, "nodes/n1");
        let action = |verb: &str, to: InstanceState, op: &str, ms: Option<u64>| {
            Command::BeginInstanceAction {
                instance: web.clone(),
                state: to,
                verb: verb.into(),
                operation_id: op.into(),
                stop_timeout_ms: ms,
            }
        };
        // Only a stop takes a timeout, and at most an hour of it; a refused
        // action changes nothing.
        assert!(matches!(
            run(
                &mut s,
                action("reboot", InstanceState::Starting, "r1", Some(5))
            ),
            Err(ApplyError::InvalidArgument(_))
        ));
        assert!(matches!(
            run(
                &mut s,
                action(
                    "stop",
                    InstanceState::Stopping,
                    "s0",
                    Some(MAX_STOP_TIMEOUT_MS + 1)
                )
            ),
            Err(ApplyError::InvalidArgument(_))
        ));
        assert_eq!(s.instances[&web].state, InstanceState::Running);
        assert!(!s.operations.contains_key("operations/s0"));
        run(
            &mut s,
            action("stop", InstanceState::Stopping, "s1", Some(2500)),
        )
        .unwrap();
        assert_eq!(s.instances[&web].stop_timeout_ms, Some(2500));
        set(&mut s, &web, InstanceState::Stopped).unwrap();
        assert_eq!(s.instances[&web].stop_timeout_ms, Some(2500));
        // A start forgets it; a stop without one asks for the default.
        run(&mut s, action("start", InstanceState::Starting, "s2", None)).unwrap();
        assert_eq!(s.instances[&web].stop_timeout_ms, None);
        set(&mut s, &web, InstanceState::Running).unwrap();
        run(
            &mut s,
            action("stop", InstanceState::Stopping, "s3", Some(0)),
        )
        .unwrap();
        assert_eq!(s.instances[&web].stop_timeout_ms, Some(0));
        set(&mut s, &web, InstanceState::Stopped).unwrap();
        run(&mut s, action("start", InstanceState::Starting, "s4", None)).unwrap();
        set(&mut s, &web, InstanceState::Running).unwrap();
        run(&mut s, action("stop", InstanceState::Stopping, "s5", None)).unwrap();
        assert_eq!(s.instances[&web].stop_timeout_ms, None);
    }

    #[test]
    fn ha_instances_restart_elsewhere_only_from_a_down_node() {
        let mut s = setup();
        let ha = running(&mut s, "ha", true, "nodes/n1");
        let plain = running(&mut s, "plain", false, "nodes/n1");
        let restart = |instance: &str, node: &str| Command::RestartInstanceElsewhere {
            instance: instance.into(),
            node: node.into(),
        };
        // The node is up: refused.
        assert!(matches!(
            run(&mut s, restart(&ha, "nodes/n1")),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        run(
            &mut s,
            Command::SetNodeState {
                node: "nodes/n1".into(),
                state: NodeState::Down,
            },
        )
        .unwrap();
        // Not HA, or not on that node: refused.
        assert!(matches!(
            run(&mut s, restart(&plain, "nodes/n1")),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        assert!(matches!(
            run(&mut s, restart(&ha, "nodes/n2")),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 4);
        run(&mut s, restart(&ha, "nodes/n1")).unwrap();
        let i = &s.instances[&ha];
        assert_eq!(i.state, InstanceState::Pending);
        assert_eq!(i.node, None);
        assert_eq!(i.boot_count, 2);
        assert_eq!(i.reason, "restarted: node n1 fenced");
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 2);
        assert!(s.events.iter().any(|e| e.resource == ha
            && e.kind == "instance.restarted"
            && e.message.starts_with("restarted: node n1 fenced")));
        // Twice is refused: it is no longer there.
        assert!(run(&mut s, restart(&ha, "nodes/n1")).is_err());
        // The scheduler may now place it on another node, not the dead one.
        let generation = s.instances[&ha].generation;
        assert!(matches!(
            run(
                &mut s,
                Command::ScheduleInstance {
                    instance: ha.clone(),
                    node: "nodes/n1".into(),
                    expected_generation: generation,
                }
            ),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        run(
            &mut s,
            Command::ScheduleInstance {
                instance: ha.clone(),
                node: "nodes/n2".into(),
                expected_generation: generation,
            },
        )
        .unwrap();
    }

    fn set(s: &mut State, name: &str, to: InstanceState) -> Result<Response, ApplyError> {
        run(
            s,
            Command::SetInstanceState {
                instance: name.into(),
                state: to,
                reason: String::new(),
                expected_generation: None,
            },
        )
    }

    #[test]
    fn switchover_only_from_the_source_of_a_running_migration() {
        let mut s = setup();
        let web = "projects/p1/instances/web-1";
        create(&mut s, "web-1").unwrap();
        run(
            &mut s,
            Command::ScheduleInstance {
                instance: web.into(),
                node: "nodes/n1".into(),
                expected_generation: 1,
            },
        )
        .unwrap();
        set(&mut s, web, InstanceState::Starting).unwrap();
        set(&mut s, web, InstanceState::Running).unwrap();
        let create_m = |id: &str| Command::CreateMigration {
            migration_id: id.into(),
            instance: web.into(),
            target: "nodes/n2".into(),
            max_downtime_ms: 0,
            cause: "test".into(),
        };
        let switch = |m: &str, node: &str| Command::SwitchMigration {
            migration: m.into(),
            node: node.into(),
            progress: None,
        };
        run(&mut s, create_m("m1")).unwrap();
        assert_eq!(s.migrations["migrations/m1"].max_downtime_ms, 50);
        let open = |s: &State| s.migration_of(web).map(|m| m.name.clone());
        assert_eq!(open(&s).as_deref(), Some("migrations/m1"));
        // Queued: the target has not said where it listens yet.
        assert!(run(&mut s, switch("migrations/m1", "nodes/n1")).is_err());
        let addr = |node: &str, a: &str| Command::UpdateMigration {
            migration: "migrations/m1".into(),
            node: node.into(),
            target_address: a.into(),
            progress: None,
        };
        // Only the target names the address.
        assert!(run(&mut s, addr("nodes/n1", "10.0.0.1:1")).is_err());
        run(&mut s, addr("nodes/n2", "10.0.0.2:7000")).unwrap();
        assert_eq!(s.migrations["migrations/m1"].state, MigrationState::Running);
        // Only the source switches over.
        assert!(run(&mut s, switch("migrations/m1", "nodes/n2")).is_err());
        run(
            &mut s,
            Command::UpdateMigration {
                migration: "migrations/m1".into(),
                node: "nodes/n1".into(),
                target_address: String::new(),
                progress: Some(MigrationProgress {
                    round: 3,
                    bytes_sent: 1000,
                    ..MigrationProgress::default()
                }),
            },
        )
        .unwrap();
        assert_eq!(s.migrations["migrations/m1"].progress.round, 3);
        let to = |state: MigrationState| Command::SetMigrationState {
            migration: "migrations/m1".into(),
            state,
            bytes_copied: 0,
            reason: String::new(),
        };
        // Nothing completes or is in doubt before the switchover is decided.
        assert!(run(&mut s, to(MigrationState::Completed)).is_err());
        assert!(run(&mut s, to(MigrationState::InDoubt)).is_err());
        assert!(run(&mut s, to(MigrationState::Switching)).is_err());
        run(&mut s, switch("migrations/m1", "nodes/n1")).unwrap();
        // Decided, not moved: the instance is still the source's, and the
        // decision cannot be taken back by a cancel.
        assert_eq!(
            s.migrations["migrations/m1"].state,
            MigrationState::Switching
        );
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n1"));
        assert_eq!(s.instances[web].state, InstanceState::Migrating);
        assert!(matches!(
            run(&mut s, to(MigrationState::Cancelled)),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        // Asked again (a lost answer): still yes, nothing changes.
        let before = s.migrations["migrations/m1"].clone();
        run(&mut s, switch("migrations/m1", "nodes/n1")).unwrap();
        assert_eq!(s.migrations["migrations/m1"], before);
        // In doubt (repeatable), then settled: the VM runs on the target.
        run(&mut s, to(MigrationState::InDoubt)).unwrap();
        run(&mut s, to(MigrationState::InDoubt)).unwrap();
        assert!(run(&mut s, to(MigrationState::Running)).is_err());
        run(&mut s, to(MigrationState::Completed)).unwrap();
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n2"));
        assert_eq!(s.instances[web].state, InstanceState::Running);
        assert_eq!(open(&s), None, "a finished migration is not open");
        assert_eq!(s.unfinished_migrations().count(), 0);
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 0);
        // Final: the switchover answer stays yes for its source, but
        // nothing moves any more.
        run(&mut s, switch("migrations/m1", "nodes/n1")).unwrap();
        assert!(run(&mut s, switch("migrations/m1", "nodes/n2")).is_err());
        assert!(run(&mut s, addr("nodes/n2", "10.0.0.2:7001")).is_err());
        assert!(run(&mut s, to(MigrationState::Failed)).is_err());
        // ...except the source's figures measured after the switchover.
        let last = |node: &str| Command::UpdateMigration {
            migration: "migrations/m1".into(),
            node: node.into(),
            target_address: String::new(),
            progress: Some(MigrationProgress {
                round: 4,
                bytes_sent: 1200,
                downtime_us: 4200,
                ..MigrationProgress::default()
            }),
        };
        assert!(run(&mut s, last("nodes/n2")).is_err(), "only the source");
        run(&mut s, last("nodes/n1")).unwrap();
        let m = &s.migrations["migrations/m1"];
        assert_eq!(m.state, MigrationState::Completed);
        assert_eq!((m.progress.downtime_us, m.bytes_copied), (4200, 1200));
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n2"));

        // Back to n1, cancelled: the switchover is refused afterwards.
        run(
            &mut s,
            Command::CreateMigration {
                migration_id: "m2".into(),
                instance: web.into(),
                target: "nodes/n1".into(),
                max_downtime_ms: 5,
                cause: String::new(),
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::UpdateMigration {
                migration: "migrations/m2".into(),
                node: "nodes/n1".into(),
                target_address: "10.0.0.1:7000".into(),
                progress: None,
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::SetMigrationState {
                migration: "migrations/m2".into(),
                state: MigrationState::Cancelled,
                bytes_copied: 0,
                reason: "asked".into(),
            },
        )
        .unwrap();
        assert!(run(&mut s, switch("migrations/m2", "nodes/n2")).is_err());
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n2"));
        assert_eq!(s.instances[web].state, InstanceState::Running);
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 0);

        // Back to n1 again, decided, then failed (the commit never went
        // out, or the target's node says its VMM never ran the VM): the
        // instance stays on n2 and n1 gives back what it held.
        run(
            &mut s,
            Command::CreateMigration {
                migration_id: "m3".into(),
                instance: web.into(),
                target: "nodes/n1".into(),
                max_downtime_ms: 0,
                cause: String::new(),
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::UpdateMigration {
                migration: "migrations/m3".into(),
                node: "nodes/n1".into(),
                target_address: "10.0.0.1:7001".into(),
                progress: None,
            },
        )
        .unwrap();
        run(&mut s, switch("migrations/m3", "nodes/n2")).unwrap();
        assert_eq!(
            s.migrations["migrations/m3"].state,
            MigrationState::Switching
        );
        assert_eq!(open(&s).as_deref(), Some("migrations/m3"));
        // A late word on a finished migration of the same instance leaves
        // the open one open.
        assert!(
            run(
                &mut s,
                Command::SetMigrationState {
                    migration: "migrations/m2".into(),
                    state: MigrationState::Failed,
                    bytes_copied: 0,
                    reason: "late".into(),
                },
            )
            .is_err()
        );
        assert_eq!(open(&s).as_deref(), Some("migrations/m3"));
        run(
            &mut s,
            Command::SetMigrationState {
                migration: "migrations/m3".into(),
                state: MigrationState::Failed,
                bytes_copied: 0,
                reason: "the target never ran it".into(),
            },
        )
        .unwrap();
        assert!(run(&mut s, switch("migrations/m3", "nodes/n2")).is_err());
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n2"));
        assert_eq!(s.instances[web].state, InstanceState::Running);
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 0);
    }

    #[test]
    fn instance_lifecycle_with_migration() {
        let mut s = setup();
        let web = "projects/p1/instances/web-1";
        create(&mut s, "web-1").unwrap();
        assert!(matches!(
            create(&mut s, "web-1"),
            Err(ApplyError::AlreadyExists { .. })
        ));
        assert!(matches!(
            set(&mut s, web, InstanceState::Running),
            Err(ApplyError::InvalidTransition { .. })
        ));
        run(
            &mut s,
            Command::ScheduleInstance {
                instance: web.into(),
                node: "nodes/n1".into(),
                expected_generation: 1,
            },
        )
        .unwrap();
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 2);
        set(&mut s, web, InstanceState::Starting).unwrap();
        assert!(!s.operations["operations/op-web-1"].done);
        set(&mut s, web, InstanceState::Running).unwrap();
        assert!(s.operations["operations/op-web-1"].done);

        run(
            &mut s,
            Command::CreateMigration {
                migration_id: "m1".into(),
                instance: web.into(),
                target: "nodes/n2".into(),
                max_downtime_ms: 0,
                cause: String::new(),
            },
        )
        .unwrap();
        assert_eq!(s.instances[web].state, InstanceState::Migrating);
        assert_eq!(s.nodes["nodes/n2"].allocated.vcpus, 2);
        run(
            &mut s,
            Command::UpdateMigration {
                migration: "migrations/m1".into(),
                node: "nodes/n2".into(),
                target_address: "10.0.0.2:7000".into(),
                progress: None,
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::SwitchMigration {
                migration: "migrations/m1".into(),
                node: "nodes/n1".into(),
                progress: None,
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::SetMigrationState {
                migration: "migrations/m1".into(),
                state: MigrationState::Completed,
                bytes_copied: 10,
                reason: String::new(),
            },
        )
        .unwrap();
        assert_eq!(s.instances[web].node.as_deref(), Some("nodes/n2"));
        assert_eq!(s.instances[web].state, InstanceState::Running);
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 0);

        assert!(matches!(
            run(
                &mut s,
                Command::PurgeInstance {
                    instance: web.into()
                }
            ),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        run(
            &mut s,
            Command::DeleteInstance {
                instance: web.into(),
                operation_id: "del-1".into(),
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::PurgeInstance {
                instance: web.into(),
            },
        )
        .unwrap();
        assert!(s.instances.is_empty());
        assert_eq!(s.nodes["nodes/n2"].allocated, Resources::default());
        assert_eq!(s.projects["projects/p1"].instance_count, 0);
        assert!(s.operations["operations/del-1"].done);
        assert!(s.events.iter().any(|e| e.kind == "instance.deleted"));
    }

    #[test]
    fn actions_open_operations_and_resize_follows_quota() {
        let mut s = setup();
        let web = "projects/p1/instances/web-1";
        create(&mut s, "web-1").unwrap();
        run(
            &mut s,
            Command::ScheduleInstance {
                instance: web.into(),
                node: "nodes/n1".into(),
                expected_generation: 1,
            },
        )
        .unwrap();
        set(&mut s, web, InstanceState::Starting).unwrap();
        set(&mut s, web, InstanceState::Running).unwrap();
        let action = |verb: &str, to: InstanceState, op: &str| Command::BeginInstanceAction {
            instance: web.into(),
            state: to,
            verb: verb.into(),
            operation_id: op.into(),
            stop_timeout_ms: None,
        };
        // A refused transition creates no operation.
        assert!(matches!(
            run(&mut s, action("start", InstanceState::Stopped, "op-x")),
            Err(ApplyError::InvalidTransition { .. })
        ));
        assert!(!s.operations.contains_key("operations/op-x"));
        assert!(matches!(
            run(&mut s, action("explode", InstanceState::Stopping, "op-x")),
            Err(ApplyError::InvalidArgument(_))
        ));
        run(&mut s, action("stop", InstanceState::Stopping, "op-stop")).unwrap();
        assert!(!s.operations["operations/op-stop"].done);
        set(&mut s, web, InstanceState::Stopped).unwrap();
        assert!(s.operations["operations/op-stop"].done);

        run(
            &mut s,
            Command::CreateFlavor {
                flavor_id: "big".into(),
                resources: Resources {
                    vcpus: 3,
                    memory_mib: 2048,
                    disk_gib: 10,
                },
            },
        )
        .unwrap();
        run(
            &mut s,
            Command::CreateFlavor {
                flavor_id: "huge".into(),
                resources: Resources {
                    vcpus: 5,
                    memory_mib: 2048,
                    disk_gib: 10,
                },
            },
        )
        .unwrap();
        let resize = |f: &str| Command::ResizeInstance {
            instance: web.into(),
            flavor: f.into(),
            node_limit: None,
        };
        assert!(matches!(
            run(&mut s, resize("flavors/huge")),
            Err(ApplyError::QuotaExceeded { .. })
        ));
        run(&mut s, resize("flavors/big")).unwrap();
        assert_eq!(s.projects["projects/p1"].usage.vcpus, 3);
        assert_eq!(s.nodes["nodes/n1"].allocated.vcpus, 3);
        assert_eq!(s.instances[web].flavor, "flavors/big");

        run(&mut s, action("start", InstanceState::Starting, "op-start")).unwrap();
        assert!(matches!(
            run(&mut s, resize("flavors/small")),
            Err(ApplyError::FailedPrecondition { .. })
        ));
        set(&mut s, web, InstanceState::Running).unwrap();
        assert!(s.operations["operations/op-start"].done);
    }

    #[test]
    fn a_resize_must_fit_its_node_and_never_shrinks_the_disk() {
        let mut s = setup();
        let web = running(&mut s, "web", false, "nodes/n1");
        let other = running(&mut s, "other", false, "nodes/n1");
        assert_ne!(web, other);
        let stop = Command::BeginInstanceAction {
            instance: web.clone(),
            state: InstanceState::Stopping,
            verb: "stop".into(),
            operation_id: "op-stop".into(),
            stop_timeout_ms: None,
        };
        run(&mut s, stop).unwrap();
        set(&mut s, &web, InstanceState::Stopped).unwrap();
        for (id, memory_mib, disk_gib) in [("medium", 2048, 20), ("tiny", 1024, 5)] {
            run(
                &mut s,
                Command::CreateFlavor {
                    flavor_id: id.into(),
                    resources: Resources {
                        vcpus: 2,
                        memory_mib,
                        disk_gib,
                    },
                },
            )
            .unwrap();
        }
        // Two smalls hold 4 vCPUs, 2048 MiB, 20 GiB of n1.
        let resize = |f: &str, limit: Option<Resources>| Command::ResizeInstance {
            instance: web.clone(),
            flavor: f.into(),
            node_limit: limit,
        };
        let tight = Resources {
            vcpus: 64,
            memory_mib: 2560,
            disk_gib: 100,
        };
        let before = s.clone();
        let err = run(&mut s, resize("flavors/medium", Some(tight))).unwrap_err();
        assert!(
            matches!(&err, ApplyError::FailedPrecondition { name, .. } if name == "nodes/n1"),
            "{err}"
        );
        assert!(err.to_string().contains("3072 MiB"), "{err}");
        assert_eq!(s.nodes, before.nodes);
        assert_eq!(s.instances, before.instances);
        assert_eq!(s.projects, before.projects);
        let err = run(&mut s, resize("flavors/tiny", None)).unwrap_err();
        assert!(err.to_string().contains("cannot shrink"), "{err}");
        let room = Resources {
            memory_mib: 3072,
            ..tight
        };
        run(&mut s, resize("flavors/medium", Some(room))).unwrap();
        assert_eq!(s.nodes["nodes/n1"].allocated.memory_mib, 3072);
        assert_eq!(s.nodes["nodes/n1"].allocated.disk_gib, 30);
        assert_eq!(s.instances[&web].resources.disk_gib, 20);
    }

    #[test]
    fn a_persons_refused_request_is_audited() {
        let mut s = setup();
        create(&mut s, "a").unwrap();
        let mut env = Envelope::new(
            s.now + 1,
            "users/alice",
            Command::DeleteInstance {
                instance: "projects/p1/instances/nope".into(),
                operation_id: "d1".into(),
            },
        );
        assert!(apply(&mut s, &env, 1).is_err());
        let e = s.events.back().unwrap();
        assert_eq!(
            (e.actor.as_str(), e.resource.as_str(), e.kind.as_str()),
            (
                "users/alice",
                "projects/p1/instances/nope",
                "request.refused"
            )
        );
        assert_eq!(e.message, "projects/p1/instances/nope does not exist");
        // What loops are refused is not audited.
        let seq = e.seq;
        env.actor = "system".into();
        assert!(apply(&mut s, &env, 1).is_err());
        assert_eq!(s.events.back().unwrap().seq, seq);
    }

    #[test]
    fn quota_is_enforced() {
        let mut s = setup();
        create(&mut s, "a").unwrap();
        create(&mut s, "b").unwrap();
        let err = create(&mut s, "c").unwrap_err();
        assert!(matches!(err, ApplyError::QuotaExceeded { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "quota of projects/p1 exceeded: at most 2 instances"
        );
        // Raising one limit keeps the others.
        let before = s.projects["projects/p1"].quota;
        run(
            &mut s,
            Command::SetProjectQuota {
                project: "projects/p1".into(),
                quota: crate::QuotaUpdate {
                    instances: Some(50),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        let after = s.projects["projects/p1"].quota;
        assert_eq!(after.instances, 50);
        assert_eq!(after.resources, before.resources);
        // ...so the kept vCPU limit (4; two instances of 2 use it) still
        // refuses a third.
        let err = create(&mut s, "c").unwrap_err();
        assert!(err.to_string().contains("vcpus: 6"), "{err}");
        run(
            &mut s,
            Command::SetProjectQuota {
                project: "projects/p1".into(),
                quota: crate::QuotaUpdate {
                    memory_mib: Some(512),
                    disk_gib: Some(7),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        let q = s.projects["projects/p1"].quota;
        assert_eq!(
            (
                q.instances,
                q.resources.vcpus,
                q.resources.memory_mib,
                q.resources.disk_gib
            ),
            (50, before.resources.vcpus, 512, 7)
        );
    }

    #[test]
    fn names_are_validated() {
        let mut s = setup();
        assert!(matches!(
            create(&mut s, "Web"),
            Err(ApplyError::InvalidName(_))
        ));
        assert!(matches!(
            run(
                &mut s,
                Command::PurgeInstance {
                    instance: "projects/p1/vms/x".into()
                }
            ),
            Err(ApplyError::InvalidName(_))
        ));
    }

    #[test]
    fn request_ids_and_fencing() {
        let mut s = setup();
        let mut env = Envelope::new(
            100,
            "test",
            Command::KvPut {
                key: "k".into(),
                value: b"v".to_vec(),
            },
        );
        env.request_id = Some("r1".into());
        let first = apply(&mut s, &env, 1).unwrap();
        let again = apply(&mut s, &env, 1).unwrap();
        assert_eq!(first, again);
        env.command = Command::KvDelete { key: "k".into() };
        assert!(matches!(
            apply(&mut s, &env, 1),
            Err(ApplyError::RequestIdReused { .. })
        ));
        // After the retention window the id may be reused.
        env.time = 100 + REQUEST_ID_RETENTION_MS + 1;
        apply(&mut s, &env, 1).unwrap();

        let mut fenced = Envelope::new(200, "loop", Command::Noop);
        fenced.fence_term = Some(3);
        assert!(apply(&mut s, &fenced, 3).is_ok());
        assert_eq!(
            apply(&mut s, &fenced, 4),
            Err(ApplyError::Fenced {
                fence_term: 3,
                term: 4
            })
        );
    }

    #[test]
    fn kv_compare_and_set() {
        let mut s = State::default();
        let put = |s: &mut State, expected_version, value: Option<&[u8]>| {
            run(
                s,
                Command::KvCas {
                    key: "k".into(),
                    expected_version,
                    value: value.map(<[u8]>::to_vec),
                },
            )
        };
        let Response::Kv { version, .. } = put(&mut s, 0, Some(b"a")).unwrap() else {
            panic!("not a kv response");
        };
        assert!(version > 0);
        assert!(matches!(
            put(&mut s, 0, Some(b"b")),
            Err(ApplyError::VersionMismatch { .. })
        ));
        put(&mut s, version, None).unwrap();
        assert!(s.kv.is_empty());
    }

    #[test]
    fn a_join_token_works_once_expires_and_keeps_to_its_node() {
        let mut s = State {
            now: 1_000,
            ..State::default()
        };
        let create = |id: &str, expire: u64, node: Option<&str>| Command::CreateJoinToken {
            token_id: id.into(),
            secret_hash: format!("hash-{id}"),
            expire_time: expire,
            node: node.map(Into::into),
        };
        let redeem = |id: &str, hash: &str, node: &str| Command::RedeemJoinToken {
            token_id: id.into(),
            secret_hash: hash.into(),
            node_id: node.into(),
        };
        assert!(matches!(
            run(&mut s, create("0f", 1_000, None)),
            Err(ApplyError::InvalidArgument(_))
        ));
        assert!(matches!(
            run(&mut s, create("not-hex", 10_000, None)),
            Err(ApplyError::InvalidName(_))
        ));
        run(&mut s, create("a", 10_000, None)).unwrap();
        run(&mut s, create("b", 10_000, Some("n2"))).unwrap();
        run(&mut s, create("c", 2_000, None)).unwrap();
        let refused = |r: Result<Response, ApplyError>, want: &str| match r {
            Err(ApplyError::FailedPrecondition { reason, .. }) => {
                assert!(reason.contains(want), "{reason}")
            }
            other => panic!("expected a refusal ({want}), got {other:?}"),
        };
        refused(
            run(&mut s, redeem("a", "wrong", "n1")),
            "unknown or invalid",
        );
        refused(
            run(&mut s, redeem("zz", "hash-zz", "n1")),
            "unknown or invalid",
        );
        let Response::JoinToken(t) = run(&mut s, redeem("a", "hash-a", "n1")).unwrap() else {
            panic!("not a join token");
        };
        assert_eq!(t.used.map(|u| u.1).as_deref(), Some("nodes/n1"));
        refused(run(&mut s, redeem("a", "hash-a", "n1")), "already used");
        refused(run(&mut s, redeem("b", "hash-b", "n1")), "for node n2");
        run(&mut s, redeem("b", "hash-b", "n2")).unwrap();
        s.now = 2_000;
        refused(run(&mut s, redeem("c", "hash-c", "n3")), "expired");
        // Creating another drops the spent ones.
        run(&mut s, create("d", 10_000, None)).unwrap();
        assert_eq!(s.join_tokens.keys().collect::<Vec<_>>(), ["joinTokens/d"]);
    }

    fn join(
        s: &mut State,
        id: &str,
        node: Option<&str>,
        joining: &str,
    ) -> Result<Response, ApplyError> {
        run(
            s,
            Command::CreateJoinToken {
                token_id: id.into(),
                secret_hash: format!("hash-{id}"),
                expire_time: s.now + 10_000,
                node: node.map(Into::into),
            },
        )?;
        run(
            s,
            Command::RedeemJoinToken {
                token_id: id.into(),
                secret_hash: format!("hash-{id}"),
                node_id: joining.into(),
            },
        )
    }

    fn refused_because(r: Result<Response, ApplyError>, want: &str) {
        match r {
            Err(ApplyError::FailedPrecondition { reason, .. }) => {
                assert!(reason.contains(want), "{reason}")
            }
            other => panic!("expected a refusal ({want}), got {other:?}"),
        }
    }

    #[test]
    fn a_token_for_any_node_cannot_take_a_known_name_over() {
        // n1 and n2 are registered (with admin tokens: never joined).
        let mut s = setup();
        refused_because(join(&mut s, "a1", None, "n1"), "already a member");
        // A new name joins with a token for any node, once; after that the
        // name is known, and only a token made for it joins it again.
        join(&mut s, "a2", None, "n3").unwrap();
        assert_eq!(s.node_members["nodes/n3"].joined, Some(s.now));
        refused_because(join(&mut s, "a3", None, "n3"), "already a member");
        join(&mut s, "a4", Some("n3"), "n3").unwrap();
        join(&mut s, "a5", Some("n1"), "n1").unwrap();
        // A refused redemption leaves the state as it was (but the clock).
        let before = s.clone();
        let r = run(
            &mut s,
            Command::RedeemJoinToken {
                token_id: "a3".into(),
                secret_hash: "hash-a3".into(),
                node_id: "n3".into(),
            },
        );
        refused_because(r, "already a member");
        assert_eq!(s.join_tokens, before.join_tokens);
        assert_eq!(s.node_members, before.node_members);
    }

    #[test]
    fn a_removed_node_is_deregistered_revoked_and_stays_out() {
        let mut s = setup();
        join(&mut s, "b1", Some("n1"), "n1").unwrap();
        // A pending token for n1 is dropped with it.
        run(
            &mut s,
            Command::CreateJoinToken {
                token_id: "b2".into(),
                secret_hash: "hash-b2".into(),
                expire_time: 1 << 40,
                node: Some("n1".into()),
            },
        )
        .unwrap();
        // Not while an instance is placed there.
        let vm = running(&mut s, "web", false, "nodes/n1");
        let remove = |node: &str| Command::RemoveNode { node: node.into() };
        refused_because(run(&mut s, remove("nodes/n1")), "drain it first");
        assert!(s.nodes.contains_key("nodes/n1"));
        assert!(!s.is_revoked_node("nodes/n1"));
        run(
            &mut s,
            Command::DeleteInstance {
                instance: vm.clone(),
                operation_id: "op-del".into(),
            },
        )
        .unwrap();
        run(&mut s, Command::PurgeInstance { instance: vm }).unwrap();
        let r = run(&mut s, remove("nodes/n1")).unwrap();
        assert_eq!(
            r,
            Response::Deleted {
                name: "nodes/n1".into()
            }
        );
        assert!(!s.nodes.contains_key("nodes/n1"));
        assert!(s.is_revoked_node("nodes/n1"));
        assert_eq!(s.revoked_nodes().collect::<Vec<_>>(), ["nodes/n1"]);
        assert!(!s.join_tokens.contains_key("joinTokens/b2"));
        // From then on: no registering, no new token, no join, not twice.
        let register = Command::RegisterNode {
            node_id: "n1".into(),
            address: "a".into(),
            capacity: Resources::default(),
            labels: Default::default(),
        };
        refused_because(run(&mut s, register), "removed");
        refused_because(join(&mut s, "b3", Some("n1"), "n1"), "removed");
        refused_because(join(&mut s, "b4", None, "n1"), "removed");
        refused_because(run(&mut s, remove("nodes/n1")), "removed");
        // A token made before the removal for any node does not join it
        // either.
        run(
            &mut s,
            Command::CreateJoinToken {
                token_id: "b5".into(),
                secret_hash: "hash-b5".into(),
                expire_time: 1 << 40,
                node: None,
            },
        )
        .unwrap();
        let r = run(
            &mut s,
            Command::RedeemJoinToken {
                token_id: "b5".into(),
                secret_hash: "hash-b5".into(),
                node_id: "n1".into(),
            },
        );
        refused_because(r, "removed");
        // A name never known is not found; one registered without ever
        // joining is removed all the same.
        assert!(matches!(
            run(&mut s, remove("nodes/nope")),
            Err(ApplyError::NotFound { .. })
        ));
        run(&mut s, remove("nodes/n2")).unwrap();
        assert_eq!(s.node_members["nodes/n2"].joined, None);
        assert!(s.is_revoked_node("nodes/n2"));
        // The snapshot keeps all of it.
        let back = codec::decode_snapshot(&codec::encode_snapshot(&s)).unwrap();
        assert_eq!(back.node_members, s.node_members);
    }

    #[test]
    fn the_cluster_ca_is_set_once() {
        let mut s = State::default();
        let ca = |key: &[u8]| crate::model::SealedCaRecord {
            cluster_id: "7".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            sealed_key: key.to_vec(),
        };
        let set = |c| Command::SetClusterCa { ca: c };
        assert!(matches!(
            run(&mut s, set(ca(b""))),
            Err(ApplyError::InvalidArgument(_))
        ));
        let mut bad = ca(b"k");
        bad.cert_pem = "not pem".into();
        assert!(matches!(
            run(&mut s, set(bad)),
            Err(ApplyError::InvalidArgument(_))
        ));
        assert!(s.cluster_ca.is_none());
        run(&mut s, set(ca(b"k1"))).unwrap();
        // Every initial member proposes the same one: fine.
        run(&mut s, set(ca(b"k1"))).unwrap();
        refused_because(run(&mut s, set(ca(b"k2"))), "another CA");
        assert_eq!(s.cluster_ca, Some(ca(b"k1")));
        let back = codec::decode_snapshot(&codec::encode_snapshot(&s)).unwrap();
        assert_eq!(back.cluster_ca, s.cluster_ca);
    }

    #[test]
    fn only_a_joined_node_that_was_not_removed_renews() {
        let mut s = setup();
        let renew = |id: &str, serial: &str| Command::RenewNodeCertificate {
            node_id: id.into(),
            serial: serial.into(),
        };
        // n1 is registered but never joined.
        refused_because(run(&mut s, renew("n1", "0a")), "never joined");
        join(&mut s, "c1", Some("n1"), "n1").unwrap();
        assert!(matches!(
            run(&mut s, renew("n1", "not hex")),
            Err(ApplyError::InvalidArgument(_))
        ));
        run(&mut s, renew("n1", "0A")).unwrap();
        assert_eq!(
            s.events.back().map(|e| e.kind.as_str()),
            Some("node.certificate_renewed")
        );
        run(
            &mut s,
            Command::RemoveNode {
                node: "nodes/n1".into(),
            },
        )
        .unwrap();
        refused_because(run(&mut s, renew("n1", "0b")), "removed");
    }
}
