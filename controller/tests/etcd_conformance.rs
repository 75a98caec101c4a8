//! The shared store conformance suite on the etcd backend: three
//! controllers (`EtcdStore`s) over one real etcd (Debian's `etcd-server`)
//! started on loopback ports with a temporary data directory. Needs the
//! `etcd` cargo feature; skipped with a message when no `etcd` binary is on
//! the PATH.
#![cfg(feature = "etcd")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use neph_controller::store::conformance;
use neph_controller::store::etcd::{EtcdConfig, EtcdStore};

struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn etcd_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("etcd"))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_over_one_etcd() -> anyhow::Result<()> {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIPPED: no etcd binary on PATH (apt-get install etcd-server)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let _etcd = Etcd(
        Command::new(bin)
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stores = Vec::new();
    for id in 1..=3 {
        let mut cfg = EtcdConfig::new(vec![client_url.clone()], id);
        cfg.prefix = "/conformance".into();
        loop {
            match EtcdStore::start(cfg.clone()).await {
                Ok(s) => {
                    stores.push(s);
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    conformance::run_all(&stores).await;

    // A fourth controller started later replays the whole log.
    let late = EtcdStore::start({
        let mut c = EtcdConfig::new(vec![client_url.clone()], 4);
        c.prefix = "/conformance".into();
        c
    })
    .await?;
    let n = neph_controller::store::StateStore::read(&late, |s| s.kv.len()).await?;
    let m = neph_controller::store::StateStore::read(&stores[0], |s| s.kv.len()).await?;
    assert_eq!(n, m);
    Ok(())
}
