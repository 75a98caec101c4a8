//! The live-migration stream between nodes, over mutual TLS (issue 7).
//!
//! The VMMs speak the migration protocol over plain TCP on loopback; on
//! each node a `neph-node tunnel` process carries it across with the
//! node's certificate:
//!
//! ```text
//!  source node                                     target node
//!  neph-vmm ──TCP──► tunnel (connect) ══mTLS══► tunnel (accept) ──TCP──► neph-vmm --incoming
//!            127.0.0.1   verifies node/<target>   admits only node/<source>   127.0.0.1
//! ```
//!
//! So only the node the controllers named as the migration's source can
//! reach a target's VMM, and only the named target receives the guest's
//! memory; nobody on the path reads it. Each extra memory stream is one
//! more connection through the same pair. A tunnel is its own process,
//! started detached like a VMM, so an agent restarted mid-migration does
//! not cut the stream (the new agent attaches, see `migrate.rs`). It ends
//! by itself: when its VMM is gone, on the target once the VM has arrived
//! (the arrival file) and nothing is in flight, on the source once nothing
//! has been in flight for [`IDLE`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nephele_tls::{ClientAuth, Identity, PeerPolicy, Revocations, TlsContext, TlsFiles};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

use crate::host;

/// What a tunnel prints once it listens (the agent waits for it).
pub const LISTENING: &str = "TUNNEL listening on";
/// How long a source tunnel waits with nothing in flight before it ends.
pub const IDLE: Duration = Duration::from_secs(10);
/// Copy buffer per direction (TLS records are at most 16 KiB; larger
/// buffers cut system calls on the bulk copy).
const BUFFER: usize = 256 << 10;

/// Which end of the stream a tunnel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Target: TLS in from the source node, plain TCP out to the VMM.
    Accept,
    /// Source: plain TCP in from the VMM, TLS out to the target node.
    Connect,
}

/// A tunnel's settings (the `neph-node tunnel` flags).
#[derive(Debug, Clone)]
pub struct TunnelArgs {
    /// The agent's data directory (the node's TLS files are in `tls/`).
    pub data_dir: PathBuf,
    /// Which end.
    pub mode: Mode,
    /// Where to listen: the node's address (accept) or loopback (connect).
    pub listen: String,
    /// Where to carry each connection: the VMM on loopback (accept) or the
    /// target node's tunnel (connect).
    pub forward: String,
    /// The other node (`node-2`): the only peer admitted or accepted.
    pub peer_node: String,
    /// The VMM this tunnel serves: it ends when that process does.
    pub vmm_pid: u32,
    /// On the target: the VMM's arrival file.
    pub arrival: Option<PathBuf>,
}

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The node has not joined: it has no certificate.
    #[error("the node's TLS files do not load (has it joined?)")]
    Tls(#[source] Box<nephele_tls::TlsConfigError>),
    /// The peer's name is not a node name.
    #[error("{0:?} is not a node name")]
    Peer(String),
    /// Listening failed.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
}

/// Runs a tunnel until it is no longer needed.
pub async fn run(args: TunnelArgs) -> Result<(), TunnelError> {
    let files = TlsFiles::in_dir(&crate::join::tls_dir(&args.data_dir));
    let ctx =
        TlsContext::load(&files, Revocations::new()).map_err(|e| TunnelError::Tls(Box::new(e)))?;
    let peer = Identity::node(args.peer_node.clone())
        .map_err(|_| TunnelError::Peer(args.peer_node.clone()))?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| TunnelError::Listen(args.listen.clone(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| TunnelError::Listen(args.listen.clone(), e))?;
    let start_ticks = host::proc_stat(args.vmm_pid).map_or(0, |s| s.start_ticks);
    println!("{LISTENING} {bound}");
    let active = Arc::new(AtomicUsize::new(0));
    let mut idle_since = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((tcp, from)) = conn else { continue };
                let _ = tcp.set_nodelay(true);
                let (ctx, peer, args, active) = (ctx.clone(), peer.clone(), args.clone(), active.clone());
                active.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Err(e) = carry(tcp, &ctx, &peer, &args).await {
                        tracing::warn!(%from, error = %e, "migration tunnel connection refused or broken");
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = tick.tick() => {
                if active.load(Ordering::SeqCst) > 0 {
                    idle_since = Instant::now();
                }
                let idle = active.load(Ordering::SeqCst) == 0;
                let vmm_gone = !host::alive(args.vmm_pid, start_ticks);
                let arrived = args.arrival.as_ref().is_some_and(|p| p.exists());
                let done = vmm_gone
                    || (idle && arrived)
                    || (idle && args.mode == Mode::Connect && idle_since.elapsed() > IDLE);
                if done {
                    tracing::info!(vmm_gone, arrived, "migration tunnel done");
                    return Ok(());
                }
            }
        }
    }
}

/// Carries one connection through the tunnel.
async fn carry(
    tcp: TcpStream,
    ctx: &TlsContext,
    peer: &Identity,
    args: &TunnelArgs,
) -> Result<(), String> {
    match args.mode {
        Mode::Accept => {
            let config = ctx
                .server_config(ClientAuth::Required)
                .map_err(|e| e.to_string())?;
            let mut tls = nephele_tls::net::accept(tcp, config)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let who = nephele_tls::identity::connection_identity(tls.get_ref().1)
                .map_err(|e| format!("no usable certificate: {e}"))?;
            if who.identity != *peer {
                let _ = tls.shutdown().await;
                return Err(format!(
                    "{} is not this migration's source {peer}",
                    who.identity
                ));
            }
            let vmm = TcpStream::connect(&args.forward)
                .await
                .map_err(|e| format!("cannot reach the VMM at {}: {e}", args.forward))?;
            let _ = vmm.set_nodelay(true);
            splice(tls, vmm).await
        }
        Mode::Connect => {
            let config = ctx
                .client_config(PeerPolicy::Exactly(peer.clone()))
                .map_err(|e| e.to_string())?;
            let tls = nephele_tls::net::connect(&args.forward, config)
                .await
                .map_err(|e| format!("cannot reach {peer} at {}: {e}", args.forward))?;
            splice(tcp, tls).await
        }
    }
}

async fn splice<A, B>(mut a: A, mut b: B) -> Result<(), String>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER)
        .await
        .map(drop)
        .map_err(|e| format!("the stream broke: {e}"))
}
