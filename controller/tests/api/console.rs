//! The console relay: `Instances.Console` and `GetConsoleLog` through the
//! controller to an in-test `Agent` (`EchoAgent`, a test double for the
//! node agent's console service: it answers every typed line with
//! `echo: <line>`; the real agent's tests cover the real one).

use std::pin::Pin;

use futures::Stream;
use nephele_proto::compute::v1 as compute;
use nephele_proto::node::v1 as node;
use nephele_proto::node::v1::agent_server::{Agent, AgentServer};
use tonic::{Code, Request, Response, Status, Streaming};

use super::support::*;

const LOG: &[u8] = b"boot line 1\nboot line 2\nready\n";

/// A test double for a node agent's `Agent` service.
#[derive(Debug, Default)]
struct EchoAgent;

type Output = Pin<Box<dyn Stream<Item = Result<compute::ConsoleResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for EchoAgent {
    type ConsoleStream = Output;

    async fn console(
        &self,
        req: Request<Streaming<compute::ConsoleRequest>>,
    ) -> Result<Response<Output>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut named = false;
            while let Ok(Some(m)) = input.message().await {
                if !named {
                    named = true;
                    if m.name != "projects/p1/instances/web" {
                        let _ = tx
                            .send(Err(Status::not_found("no such instance here")))
                            .await;
                        return;
                    }
                }
                if m.input.is_empty() {
                    continue;
                }
                let mut out = b"echo: ".to_vec();
                out.extend_from_slice(&m.input);
                if tx
                    .send(Ok(compute::ConsoleResponse { output: out }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_console_log(
        &self,
        req: Request<compute::GetConsoleLogRequest>,
    ) -> Result<Response<compute::ConsoleLog>, Status> {
        let max = usize::try_from(req.into_inner().max_bytes).unwrap_or(usize::MAX);
        let data = LOG[LOG.len().saturating_sub(max)..].to_vec();
        Ok(Response::new(compute::ConsoleLog { data }))
    }
}

async fn serve_agent() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(EchoAgent))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(address)
}

/// Opens a console on `name` that must be refused; returns why.
async fn refused(c: &mut Clients, name: &str) -> anyhow::Result<Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(typed(name, b"")).await?;
    match c
        .instances
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(_) => anyhow::bail!("a console on {name:?} was opened"),
        Err(s) => Ok(s),
    }
}

fn typed(name: &str, input: &[u8]) -> compute::ConsoleRequest {
    compute::ConsoleRequest {
        name: name.into(),
        input: input.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_log_are_relayed_from_the_node() -> anyhow::Result<()> {
    let mut env = start().await?;
    let (alice_t, _, carol_t) = populate(&mut env.admin).await?;
    let mut alice = clients(&env.channel, Some(&alice_t));
    let mut carol = clients(&env.channel, Some(&carol_t));
    let address = serve_agent().await?;
    let mut n1 = FakeNode::register_at(&env.admin, "n1", 8, 8192, &address).await?;
    let _alive = n1.keep_alive();
    let web = "projects/p1/instances/web";
    create(&mut alice, "web", instance_template("small", "")).await?;
    wait_state(&mut alice, web, compute::InstanceState::Scheduled).await?;

    // Not running yet: no live console, but the log is there.
    let err = refused(&mut alice, web).await?;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "FAILED_PRECONDITION");
    assert!(err.message().contains("instance is not running"), "{err:?}");
    let log = alice
        .instances
        .get_console_log(compute::GetConsoleLogRequest {
            name: web.into(),
            max_bytes: 6,
        })
        .await?
        .into_inner();
    assert_eq!(log.data, b"ready\n");

    n1.converge().await?;
    wait_state(&mut alice, web, compute::InstanceState::Running).await?;

    // Another project's member may not attach.
    let err = refused(&mut carol, web).await?;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_err(
        carol
            .instances
            .get_console_log(compute::GetConsoleLogRequest {
                name: web.into(),
                max_bytes: 0,
            })
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // A round trip, both ways, several times on one stream.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(typed(web, b"uname\n")).await?;
    let mut out = alice
        .instances
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = out.message().await?.expect("output");
    assert_eq!(first.output, b"echo: uname\n");
    tx.send(typed("", b"ls\n")).await?;
    let second = out.message().await?.expect("output");
    assert_eq!(second.output, b"echo: ls\n");
    // Hanging up ends the relay.
    drop(tx);
    assert!(out.message().await?.is_none());

    // The node stops answering: UNAVAILABLE, naming it.
    n1.agent
        .register_node(node::RegisterNodeRequest {
            node_id: "n1".into(),
            address: "127.0.0.1:9".into(),
            capacity: Some(compute::Resources {
                vcpus: 8,
                memory_mib: 8192,
                disk_gib: 100,
            }),
            labels: Default::default(),
        })
        .await?;
    let err = refused(&mut alice, web).await?;
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "NODE_UNAVAILABLE");
    assert!(
        err.message().starts_with("node n1 does not answer"),
        "{err:?}"
    );
    assert_err(
        alice
            .instances
            .get_console_log(compute::GetConsoleLogRequest {
                name: web.into(),
                max_bytes: 0,
            })
            .await,
        Code::Unavailable,
        "NODE_UNAVAILABLE",
    );
    // A first message that names nothing is refused.
    let err = refused(&mut alice, "").await?;
    assert_eq!(err.code(), Code::InvalidArgument);
    env.member.stop().await?;
    Ok(())
}
