//! The authorization table walked through the real gRPC server: every RPC
//! of `authz::RULES`, called as the admin, a member and a reader of project
//! A (`p1`), against project A's and project B's (`p2`) resources, must be
//! refused with PERMISSION_DENIED exactly where the table says, and get
//! past authorization everywhere else. The unit test beside the table
//! checks the rules; this one checks that each handler applies its rule to
//! what the request really names.
//!
//! One pass-through bytes codec serves every RPC (`tonic::client::Grpc`);
//! each request carries only the fields that name its target (encoded by
//! hand: field number and value), unary and streaming alike. Refused calls
//! name real resources (a refusal must come before anything about them is
//! said), so must read-only calls; calls the table allows and that would
//! change something name resources that do not exist, so the walk changes
//! nothing, which it checks at the end.

use std::time::Duration;

use neph_controller::api::authz::{RULES, Role, Rule};
use neph_controller::store::StateStore as _;
use nephele_proto::compute::v1 as compute;
use nephele_proto::iam::v1 as iam;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::support::*;

/// Sends and receives raw protobuf bytes.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One field of a hand-encoded request.
#[derive(Debug, Clone, Copy)]
enum F {
    /// A string field; `{P}` and the other placeholders are filled in.
    S(u32, &'static str),
    /// A `google.protobuf.Duration` of this many milliseconds.
    Ms(u32, u32),
    /// A message field holding one string field 1 (`Project.name`).
    Named(u32, &'static str),
}

fn varint(out: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, out);
}

fn len_field(out: &mut Vec<u8>, n: u32, bytes: &[u8]) {
    varint(out, u64::from(n) << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// How a call fills its placeholders.
struct Fill {
    project: String,
    user: String,
    instance: &'static str,
    group: &'static str,
    token: &'static str,
    operation: String,
    node: &'static str,
    flavor: &'static str,
    image: &'static str,
}

impl Fill {
    fn apply(&self, t: &str) -> String {
        t.replace("{P}", &self.project)
            .replace("{U}", &self.user)
            .replace("{I}", self.instance)
            .replace("{G}", self.group)
            .replace("{T}", self.token)
            .replace("{O}", &self.operation)
            .replace("{N}", self.node)
            .replace("{F}", self.flavor)
            .replace("{M}", self.image)
    }

    fn encode(&self, fields: &[F]) -> Bytes {
        let mut out = Vec::new();
        for f in fields {
            match *f {
                F::S(n, t) => len_field(&mut out, n, self.apply(t).as_bytes()),
                F::Ms(n, ms) => {
                    let mut d = Vec::new();
                    varint(&mut d, 2 << 3);
                    varint(&mut d, u64::from(ms) * 1_000_000);
                    len_field(&mut out, n, &d);
                }
                F::Named(n, t) => {
                    let mut inner = Vec::new();
                    len_field(&mut inner, 1, self.apply(t).as_bytes());
                    len_field(&mut out, n, &inner);
                }
            }
        }
        Bytes::from(out)
    }
}

/// How an RPC is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

/// What each RPC of the table is sent: the fields naming its target, and
/// how it streams. Every RPC of `RULES` must be here.
fn request(rpc: &str) -> Option<(Kind, &'static [F])> {
    use F::*;
    use Kind::*;
    let method = rpc.rsplit('/').next()?;
    let service = rpc.split('/').nth(1)?;
    let r: (Kind, &'static [F]) = match (service, method) {
        (_, "GetCaller") => (Unary, &[]),
        (_, "CreateProject") => (Unary, &[]),
        (_, "GetProject" | "DeleteProject") => (Unary, &[S(1, "{P}")]),
        (_, "ListProjects") => (Unary, &[]),
        (_, "UpdateProject") => (Unary, &[Named(1, "{P}")]),
        (_, "CreateUser" | "ListUsers") => (Unary, &[]),
        (_, "GetUser" | "DeleteUser") => (Unary, &[S(1, "{U}")]),
        (_, "SetRole") => (Unary, &[S(1, "{U}"), S(2, "{P}")]),
        (_, "CreateToken" | "ListTokens") => (Unary, &[S(1, "{U}")]),
        (_, "DeleteToken") => (Unary, &[S(1, "{U}/tokens/{T}")]),
        (_, "CreateFlavor" | "ListFlavors") => (Unary, &[]),
        (_, "GetFlavor" | "DeleteFlavor") => (Unary, &[S(1, "flavors/{F}")]),
        (_, "CreateImage" | "ListImages") => (Unary, &[]),
        (_, "UploadImage") => (ClientStream, &[]),
        (_, "GetImage" | "DeleteImage") => (Unary, &[S(1, "images/{M}")]),
        (
            "nephele.compute.v1.Instances",
            "CreateInstance" | "BatchCreateInstances" | "ListInstances",
        ) => (Unary, &[S(1, "{P}")]),
        (
            "nephele.compute.v1.Instances",
            "GetInstance" | "StartInstance" | "StopInstance" | "RebootInstance" | "ResizeInstance"
            | "DeleteInstance" | "GetConsoleLog",
        ) => (Unary, &[S(1, "{P}/instances/{I}")]),
        ("nephele.compute.v1.Instances", "Console") => (Bidi, &[S(1, "{P}/instances/{I}")]),
        ("nephele.compute.v1.ServerGroups", "CreateServerGroup" | "ListServerGroups") => {
            (Unary, &[S(1, "{P}")])
        }
        ("nephele.compute.v1.ServerGroups", "GetServerGroup" | "DeleteServerGroup") => {
            (Unary, &[S(1, "{P}/serverGroups/{G}")])
        }
        ("nephele.infra.v1.Nodes", "ListNodes" | "CreateJoinToken") => (Unary, &[]),
        ("nephele.infra.v1.Nodes", _) => (Unary, &[S(1, "nodes/{N}")]),
        ("nephele.infra.v1.Migrations", "CreateMigration") => (Unary, &[S(1, "{P}/instances/{I}")]),
        ("nephele.infra.v1.Migrations", "ListMigrations") => (Unary, &[]),
        ("nephele.infra.v1.Migrations", _) => (Unary, &[S(1, "migrations/nope")]),
        ("nephele.infra.v1.Cluster", "GetClusterStatus") => (Unary, &[]),
        ("nephele.ops.v1.Operations", "GetOperation") => (Unary, &[S(1, "{O}")]),
        ("nephele.ops.v1.Operations", "WaitOperation") => (Unary, &[S(1, "{O}"), Ms(2, 1)]),
        ("nephele.ops.v1.Operations", "ListOperations") => (Unary, &[]),
        ("nephele.ops.v1.Events", "ListEvents") => (Unary, &[]),
        ("nephele.ops.v1.Events", "WatchEvents") => (ServerStream, &[]),
        ("nephele.node.v1.NodeAgent", "RegisterNode") => (Unary, &[]),
        ("nephele.node.v1.NodeAgent", "WatchAssignments") => (ServerStream, &[S(1, "nodes/{N}")]),
        ("nephele.node.v1.NodeAgent", "ReportInstanceState") => {
            (Unary, &[S(1, "nodes/{N}"), S(2, "{P}/instances/{I}")])
        }
        ("nephele.node.v1.NodeAgent", "ReportMigration" | "RequestSwitchover") => {
            (Unary, &[S(1, "nodes/{N}"), S(2, "migrations/nope")])
        }
        ("nephele.node.v1.NodeAgent", "FetchImage") => (
            ServerStream,
            &[S(1, "nodes/{N}"), S(2, "images/{M}"), S(3, "kernel")],
        ),
        ("nephele.node.v1.NodeAgent", _) => (Unary, &[S(1, "nodes/{N}")]),
        _ => return None,
    };
    Some(r)
}

/// Whether an RPC only reads (so it may name real resources even when
/// allowed).
fn reads_only(rpc: &str) -> bool {
    let method = rpc.rsplit('/').next().unwrap_or_default();
    ["Get", "List", "Watch", "Wait"]
        .iter()
        .any(|p| method.starts_with(p))
        || method == "Console"
}

/// Whether the table lets `who` (a role in project A, or admin) call an RPC
/// with `rule` on project A's (`own`) or project B's resources: written out
/// apart from `authz::authorize`.
fn allowed(rule: Rule, who: &str, own: bool) -> bool {
    match (rule, who) {
        (_, "admin") | (Rule::Authenticated, _) => true,
        (Rule::Admin, _) => false,
        (Rule::SelfOrAdmin, _) => own,
        (Rule::Project(_), _) if !own => false,
        (Rule::Project(Role::Reader), "reader" | "member") => true,
        (Rule::Project(Role::Member), "member") => true,
        (Rule::Project(_), _) => false,
    }
}

async fn call(
    channel: &tonic::transport::Channel,
    token: &str,
    rpc: &'static str,
    kind: Kind,
    body: Bytes,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(e) = grpc.ready().await {
        panic!("the channel is not ready: {e}");
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(rpc);
    let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {token}").parse().expect("ascii");
    fn authed<T>(
        mut r: tonic::Request<T>,
        auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ) -> tonic::Request<T> {
        r.metadata_mut().insert("authorization", auth.clone());
        r.set_timeout(Duration::from_secs(10));
        r
    }
    let code = match kind {
        Kind::Unary => grpc
            .unary(authed(tonic::Request::new(body), &auth), path, Raw)
            .await
            .map(|_| ()),
        Kind::ServerStream => grpc
            .server_streaming(authed(tonic::Request::new(body), &auth), path, Raw)
            .await
            .map(|_| ()),
        Kind::ClientStream => grpc
            .client_streaming(
                authed(tonic::Request::new(tokio_stream::once(body)), &auth),
                path,
                Raw,
            )
            .await
            .map(|_| ()),
        Kind::Bidi => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            tx.send(body).await.expect("send");
            let input = tokio_stream::wrappers::ReceiverStream::new(rx);
            let r = grpc
                .streaming(authed(tonic::Request::new(input), &auth), path, Raw)
                .await;
            drop(tx);
            match r {
                // A refusal may also come as the stream's first item.
                Ok(resp) => resp.into_inner().message().await.map(|_| ()),
                Err(s) => Err(s),
            }
        }
    };
    match code {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// What must not change while the walk runs.
fn resources(s: &nephele_state::State) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        s.projects.clone(),
        s.users.clone(),
        s.tokens.clone(),
        s.flavors.clone(),
        s.images.clone(),
        s.instances.clone(),
        s.server_groups.clone(),
        s.nodes.clone(),
        s.migrations.clone(),
        s.node_members.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_exactly_where_the_table_says() -> anyhow::Result<()> {
    // Nodes never time out here: nothing moves while the walk runs.
    let mut options = test_options();
    options.reconcile.node_timeout = Duration::from_secs(600);
    let mut env = start_with(options).await?;
    // alice: member of p1 (A); bob: reader of p1; carol: member of p2 (B).
    let (alice_t, bob_t, _carol_t) = populate(&mut env.admin).await?;
    let _node = FakeNode::register(&env.admin, "n1", 8, 8192).await?;
    // In each project: an instance (placed on n1, which never runs it), a
    // server group, and the instance's create operation.
    let mut ops = Vec::new();
    for p in ["p1", "p2"] {
        let op = env
            .admin
            .instances
            .create_instance(compute::CreateInstanceRequest {
                parent: format!("projects/{p}"),
                instance_id: "web".into(),
                instance: Some(instance_template("small", "")),
                request_id: String::new(),
            })
            .await?
            .into_inner();
        ops.push(op.name);
        env.admin
            .groups
            .create_server_group(compute::CreateServerGroupRequest {
                parent: format!("projects/{p}"),
                server_group_id: "g".into(),
                server_group: Some(compute::ServerGroup {
                    policy: compute::GroupPolicy::AntiAffinity as i32,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await?;
    }
    for p in ["p1", "p2"] {
        wait_state(
            &mut env.admin,
            &format!("projects/{p}/instances/web"),
            compute::InstanceState::Scheduled,
        )
        .await?;
    }
    let caller = |c: &mut Clients| {
        let mut iam = c.iam.clone();
        async move {
            anyhow::Ok(
                iam.get_caller(iam::GetCallerRequest {})
                    .await?
                    .into_inner()
                    .name,
            )
        }
    };
    let admin_user = caller(&mut env.admin).await?;
    let callers = [
        ("admin", env.token.clone(), admin_user),
        ("member", alice_t, "users/alice".to_owned()),
        ("reader", bob_t, "users/bob".to_owned()),
    ];
    let before = env.member.store.read(resources).await?;

    let mut checked = 0;
    let mut wrong = Vec::new();
    for (rpc, rule) in RULES {
        let (kind, fields) =
            request(rpc).unwrap_or_else(|| panic!("{rpc} has no request in the walk"));
        for (who, token, user) in &callers {
            for own in [true, false] {
                let ok = allowed(*rule, who, own);
                // Changes that would go through name nothing real.
                let safe = ok && !reads_only(rpc);
                let admin_only = matches!(rule, Rule::Admin);
                let fill = Fill {
                    project: if safe && admin_only {
                        "projects/nope".into()
                    } else if own {
                        "projects/p1".into()
                    } else {
                        "projects/p2".into()
                    },
                    user: if safe && admin_only {
                        "users/nope".into()
                    } else if own {
                        user.clone()
                    } else {
                        "users/carol".into()
                    },
                    instance: if safe { "nope" } else { "web" },
                    group: if safe { "nope" } else { "g" },
                    token: if safe { "nope" } else { "t1" },
                    operation: if own { ops[0].clone() } else { ops[1].clone() },
                    node: if safe { "nope" } else { "n1" },
                    flavor: if safe { "nope" } else { "small" },
                    image: if safe { "nope" } else { "guest" },
                };
                let code = call(&env.channel, token, rpc, kind, fill.encode(fields)).await;
                // Allowed: past authorization, into the handler (which may
                // well refuse an empty request); a wrong path or a request
                // the server cannot decode would not be.
                let fine = if ok {
                    !matches!(
                        code,
                        Code::PermissionDenied
                            | Code::Unauthenticated
                            | Code::Unimplemented
                            | Code::Internal
                    )
                } else {
                    code == Code::PermissionDenied
                };
                if !fine {
                    wrong.push(format!(
                        "{who} on {} ({}) calling {rpc}: {code:?}, the table says {}",
                        if own { "A" } else { "B" },
                        fill.project,
                        if ok { "allowed" } else { "PERMISSION_DENIED" }
                    ));
                }
                checked += 1;
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every RPC of a table that is not empty.
    assert!(RULES.len() > 40, "only {} rules", RULES.len());
    assert_eq!(checked, RULES.len() * 6);
    let after = env.member.store.read(resources).await?;
    assert_eq!(before, after, "the walk changed something");
    Ok(())
}
