//! Authorization: the one table saying which role each RPC needs, and on
//! what. Every handler calls [`authorize`] with its own RPC path before it
//! touches state; a test walks the whole table (every role x every RPC x own
//! and foreign project) and checks that every RPC of every public service is
//! in it, and `controller/tests/api/authz_walk.rs` walks it again through
//! the real gRPC server, so each handler is seen to apply its rule to what
//! the request names.
//!
//! Roles, weakest first: a **reader** reads a project's resources; a
//! **member** also creates, changes and deletes them; an **admin** (a user
//! with `admin = true`) does everything, in every project and on cluster
//! resources (flavors, images, nodes, migrations, users, projects). In the
//! state, viewers are readers and editors and owners are members.

use super::auth::Caller;
use super::errors::ApiError;

/// A caller's power in one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads the project's resources.
    Reader,
    /// Also creates, changes and deletes them.
    Member,
    /// Everything, everywhere.
    Admin,
}

/// What an RPC requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Any authenticated caller (results are filtered to what it may read).
    Authenticated,
    /// At least this role in the project the request names.
    Project(Role),
    /// The user the request names, or an admin.
    SelfOrAdmin,
    /// Admins only.
    Admin,
}

/// What a request is about, as far as authorization goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Nothing in particular (cluster-wide).
    Cluster,
    /// A project: `projects/{project}`.
    Project(&'a str),
    /// A user: `users/{user}`.
    User(&'a str),
}

/// Every RPC of the public services and the rule it needs.
pub const RULES: &[(&str, Rule)] = &[
    ("/nephele.iam.v1.Iam/GetCaller", Rule::Authenticated),
    ("/nephele.iam.v1.Iam/CreateProject", Rule::Admin),
    (
        "/nephele.iam.v1.Iam/GetProject",
        Rule::Project(Role::Reader),
    ),
    ("/nephele.iam.v1.Iam/ListProjects", Rule::Authenticated),
    ("/nephele.iam.v1.Iam/UpdateProject", Rule::Admin),
    ("/nephele.iam.v1.Iam/DeleteProject", Rule::Admin),
    ("/nephele.iam.v1.Iam/CreateUser", Rule::Admin),
    ("/nephele.iam.v1.Iam/GetUser", Rule::SelfOrAdmin),
    ("/nephele.iam.v1.Iam/ListUsers", Rule::Admin),
    ("/nephele.iam.v1.Iam/DeleteUser", Rule::Admin),
    ("/nephele.iam.v1.Iam/SetRole", Rule::Admin),
    ("/nephele.iam.v1.Iam/CreateToken", Rule::SelfOrAdmin),
    ("/nephele.iam.v1.Iam/ListTokens", Rule::SelfOrAdmin),
    ("/nephele.iam.v1.Iam/DeleteToken", Rule::SelfOrAdmin),
    ("/nephele.compute.v1.Flavors/CreateFlavor", Rule::Admin),
    ("/nephele.compute.v1.Flavors/GetFlavor", Rule::Authenticated),
    (
        "/nephele.compute.v1.Flavors/ListFlavors",
        Rule::Authenticated,
    ),
    ("/nephele.compute.v1.Flavors/DeleteFlavor", Rule::Admin),
    ("/nephele.compute.v1.Images/CreateImage", Rule::Admin),
    ("/nephele.compute.v1.Images/UploadImage", Rule::Admin),
    ("/nephele.compute.v1.Images/GetImage", Rule::Authenticated),
    ("/nephele.compute.v1.Images/ListImages", Rule::Authenticated),
    ("/nephele.compute.v1.Images/DeleteImage", Rule::Admin),
    (
        "/nephele.compute.v1.Instances/CreateInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/BatchCreateInstances",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/GetInstance",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.compute.v1.Instances/ListInstances",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.compute.v1.Instances/StartInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/StopInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/RebootInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/ResizeInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/DeleteInstance",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/Console",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.Instances/GetConsoleLog",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.compute.v1.ServerGroups/CreateServerGroup",
        Rule::Project(Role::Member),
    ),
    (
        "/nephele.compute.v1.ServerGroups/GetServerGroup",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.compute.v1.ServerGroups/ListServerGroups",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.compute.v1.ServerGroups/DeleteServerGroup",
        Rule::Project(Role::Member),
    ),
    ("/nephele.infra.v1.Nodes/GetNode", Rule::Admin),
    ("/nephele.infra.v1.Nodes/ListNodes", Rule::Admin),
    ("/nephele.infra.v1.Nodes/DisableNode", Rule::Admin),
    ("/nephele.infra.v1.Nodes/EnableNode", Rule::Admin),
    ("/nephele.infra.v1.Nodes/DrainNode", Rule::Admin),
    ("/nephele.infra.v1.Nodes/CreateJoinToken", Rule::Admin),
    ("/nephele.infra.v1.Nodes/RemoveNode", Rule::Admin),
    ("/nephele.infra.v1.Migrations/CreateMigration", Rule::Admin),
    ("/nephele.infra.v1.Migrations/GetMigration", Rule::Admin),
    ("/nephele.infra.v1.Migrations/CancelMigration", Rule::Admin),
    ("/nephele.infra.v1.Migrations/ListMigrations", Rule::Admin),
    ("/nephele.infra.v1.Cluster/GetClusterStatus", Rule::Admin),
    // Operations and events are read with the role on the project of the
    // resource they concern; cluster-wide ones (nodes, migrations) need
    // an admin. Lists are filtered the same way.
    (
        "/nephele.ops.v1.Operations/GetOperation",
        Rule::Project(Role::Reader),
    ),
    (
        "/nephele.ops.v1.Operations/ListOperations",
        Rule::Authenticated,
    ),
    (
        "/nephele.ops.v1.Operations/WaitOperation",
        Rule::Project(Role::Reader),
    ),
    ("/nephele.ops.v1.Events/ListEvents", Rule::Authenticated),
    ("/nephele.ops.v1.Events/WatchEvents", Rule::Authenticated),
    // Without a node certificate (the transition path, see
    // `Api::authorize_node`), node agents authenticate as an admin; with
    // one, this table is not consulted.
    ("/nephele.node.v1.NodeAgent/RegisterNode", Rule::Admin),
    ("/nephele.node.v1.NodeAgent/Heartbeat", Rule::Admin),
    ("/nephele.node.v1.NodeAgent/WatchAssignments", Rule::Admin),
    ("/nephele.node.v1.NodeAgent/GetAssignments", Rule::Admin),
    (
        "/nephele.node.v1.NodeAgent/ReportInstanceState",
        Rule::Admin,
    ),
    ("/nephele.node.v1.NodeAgent/ReportMigration", Rule::Admin),
    ("/nephele.node.v1.NodeAgent/RequestSwitchover", Rule::Admin),
    ("/nephele.node.v1.NodeAgent/FetchImage", Rule::Admin),
];

/// The rule of `rpc`, if it is in the table.
pub fn rule(rpc: &str) -> Option<Rule> {
    RULES.iter().find(|(r, _)| *r == rpc).map(|(_, rule)| *rule)
}

/// Whether `caller` may call `rpc` on `target`. An RPC missing from the
/// table is refused.
pub fn authorize(caller: &Caller, rpc: &str, target: Target<'_>) -> Result<(), ApiError> {
    let Some(rule) = rule(rpc) else {
        return Err(ApiError::PermissionDenied(format!(
            "{rpc} is not in the authorization table"
        )));
    };
    if caller.admin {
        return Ok(());
    }
    let denied = |what: String| {
        ApiError::PermissionDenied(format!(
            "{} may not {what}; ask an admin for the role",
            caller.user
        ))
    };
    match (rule, target) {
        (Rule::Authenticated, _) => Ok(()),
        (Rule::Admin, _) => Err(denied(format!("call {rpc} (admins only)"))),
        (Rule::SelfOrAdmin, Target::User(user)) if user == caller.user => Ok(()),
        (Rule::SelfOrAdmin, _) => Err(denied(format!("call {rpc} for another user"))),
        (Rule::Project(need), Target::Project(project)) => match caller.role_in(project) {
            Some(have) if have >= need => Ok(()),
            Some(_) => Err(denied(format!(
                "call {rpc} in {project} (needs the {need:?} role)"
            ))),
            None => Err(denied(format!("access {project}"))),
        },
        (Rule::Project(_), _) => Err(denied(format!(
            "call {rpc} outside a project (admins only)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::*;

    fn caller(admin: bool, role: Option<Role>) -> Caller {
        Caller {
            user: "users/u".into(),
            admin,
            roles: role
                .map(|r| ("projects/own".to_owned(), r))
                .into_iter()
                .collect(),
            origin: None,
        }
    }

    /// What each rule must allow, written out independently of `authorize`:
    /// (rule, caller kind, own project?) -> allowed.
    fn expected(rule: Rule, who: &str, own: bool) -> bool {
        match (rule, who) {
            (_, "admin") => true,
            (Rule::Authenticated, _) => true,
            (Rule::Admin, _) => false,
            // The walk targets a user resource only for SelfOrAdmin; "own"
            // means the caller's own user there.
            (Rule::SelfOrAdmin, _) => own,
            (Rule::Project(_), "none") => false,
            (Rule::Project(_), _) if !own => false,
            (Rule::Project(Role::Reader), "reader" | "member") => true,
            (Rule::Project(Role::Member), "member") => true,
            (Rule::Project(_), _) => false,
        }
    }

    #[test]
    fn the_whole_table_for_every_role_and_project() {
        let callers = [
            ("admin", caller(true, None)),
            ("member", caller(false, Some(Role::Member))),
            ("reader", caller(false, Some(Role::Reader))),
            ("none", caller(false, None)),
        ];
        let mut checked = 0;
        for (rpc, rule) in RULES {
            for (who, c) in &callers {
                for own in [true, false] {
                    let target = match rule {
                        Rule::SelfOrAdmin => {
                            Target::User(if own { "users/u" } else { "users/other" })
                        }
                        _ => Target::Project(if own {
                            "projects/own"
                        } else {
                            "projects/foreign"
                        }),
                    };
                    let got = authorize(c, rpc, target);
                    assert_eq!(
                        got.is_ok(),
                        expected(*rule, who, own),
                        "{who} calling {rpc} on {target:?}: {got:?}"
                    );
                    if let Err(e) = got {
                        assert_eq!(e.reason(), "PERMISSION_DENIED");
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, RULES.len() * 8);
        // A project-scoped RPC without a project is for admins only.
        assert!(
            authorize(
                &callers[1].1,
                "/nephele.compute.v1.Instances/ListInstances",
                Target::Cluster
            )
            .is_err()
        );
        assert!(authorize(&callers[0].1, "/nephele.x.v1.X/Unknown", Target::Cluster).is_err());
    }

    #[test]
    fn every_public_rpc_is_in_the_table() {
        let fds = prost_types::FileDescriptorSet::decode(nephele_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut public = BTreeSet::new();
        for file in &fds.file {
            let package = file.package();
            if package == "nephele.cluster.v1" || !package.starts_with("nephele.") {
                continue;
            }
            for service in &file.service {
                // Served by node agents for the controllers, not by us.
                if package == "nephele.node.v1" && service.name() == "Agent" {
                    continue;
                }
                // Authenticated by its join token (Join) or the node's
                // certificate (Renew), not by a bearer token.
                if package == "nephele.node.v1" && service.name() == "NodeJoin" {
                    continue;
                }
                for method in &service.method {
                    public.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        let table: BTreeSet<String> = RULES.iter().map(|(r, _)| (*r).to_owned()).collect();
        assert_eq!(
            public, table,
            "the authorization table and the protos differ"
        );
    }
}
