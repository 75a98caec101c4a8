//! A real etcd (Debian's `etcd-server`) on free loopback ports with a
//! temporary data directory, for the etcd backend's tests; killed on drop.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// A running etcd, killed on drop.
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    _dir: TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
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

/// Starts etcd on loopback; `None` (with a message) when it is not
/// installed.
pub fn start_etcd() -> anyhow::Result<Option<Etcd>> {
    let Some(bin) = etcd_binary() else {
        eprintln!("SKIPPED: no etcd binary on PATH (apt-get install etcd-server)");
        return Ok(None);
    };
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "test"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen-client-urls", &url])
        .args(["--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Some(Etcd {
        child,
        url,
        _dir: dir,
    }))
}
