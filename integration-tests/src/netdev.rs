//! Tap devices and bridges for tests, made with `ip` and removed when the
//! handle is dropped, even when the test fails.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors while making host network devices.
#[derive(Debug, thiserror::Error)]
pub enum NetDevError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("could not run `ip` (install iproute2): {0}")]
    Spawn(std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), NetDevError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetDevError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetDevError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A name no other test in any process uses: `<prefix><pid><n>`, at most 15
/// bytes as Linux requires.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    name.chars().take(15).collect()
}

/// A host network device that is deleted on drop.
#[derive(Debug)]
pub struct NetDev {
    pub name: String,
}

impl NetDev {
    /// A tap device, up, optionally with an IPv4 address (`10.0.0.1/24`).
    pub fn tap(address: Option<&str>) -> Result<Self, NetDevError> {
        let dev = Self {
            name: unique_name("ntap"),
        };
        ip(&["tuntap", "add", "dev", &dev.name, "mode", "tap"])?;
        dev.up(address)?;
        Ok(dev)
    }

    /// A bridge, up, optionally with an IPv4 address.
    pub fn bridge(address: Option<&str>) -> Result<Self, NetDevError> {
        let dev = Self {
            name: unique_name("nbr"),
        };
        ip(&["link", "add", "name", &dev.name, "type", "bridge"])?;
        dev.up(address)?;
        Ok(dev)
    }

    /// Attaches this device to a bridge.
    pub fn attach_to(&self, bridge: &NetDev) -> Result<(), NetDevError> {
        ip(&["link", "set", &self.name, "master", &bridge.name])
    }

    fn up(&self, address: Option<&str>) -> Result<(), NetDevError> {
        if let Some(address) = address {
            ip(&["addr", "add", address, "dev", &self.name])?;
        }
        ip(&["link", "set", &self.name, "up"])
    }
}

impl Drop for NetDev {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_linux_limits_and_differ() {
        let a = unique_name("ntap");
        let b = unique_name("ntap");
        assert_ne!(a, b);
        assert!(a.len() <= 15 && b.len() <= 15);
    }
}
