//! Network namespaces, tap devices and bridges for tests, made with `ip` and
//! removed when the handle is dropped, even when the test fails. Tests that
//! send packets do it inside a namespace they create, never on the host's
//! own network.

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

/// A network namespace, deleted (with every device in it) on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Result<Self, NetDevError> {
        let ns = Self {
            name: unique_name("nns"),
        };
        ip(&["netns", "add", &ns.name])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<(), NetDevError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A tap device in this namespace, up, optionally with an IPv4 address
    /// (`10.99.0.1/24`).
    pub fn tap(&self, address: Option<&str>) -> Result<String, NetDevError> {
        let name = unique_name("ntap");
        self.ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        self.up(&name, address)?;
        Ok(name)
    }

    /// A bridge in this namespace, up, optionally with an IPv4 address.
    pub fn bridge(&self, address: Option<&str>) -> Result<String, NetDevError> {
        let name = unique_name("nbr");
        self.ip(&["link", "add", "name", &name, "type", "bridge"])?;
        self.up(&name, address)?;
        Ok(name)
    }

    /// Attaches device `dev` to `bridge`.
    pub fn attach(&self, dev: &str, bridge: &str) -> Result<(), NetDevError> {
        self.ip(&["link", "set", dev, "master", bridge])
    }

    fn up(&self, dev: &str, address: Option<&str>) -> Result<(), NetDevError> {
        if let Some(address) = address {
            self.ip(&["addr", "add", address, "dev", dev])?;
        }
        self.ip(&["link", "set", dev, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> String {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn namespace_and_its_devices_are_removed_on_drop() {
        let name = {
            let ns = NetNs::new().expect("create a namespace (needs root and iproute2)");
            let bridge = ns.bridge(Some("10.99.7.1/24")).unwrap();
            let tap = ns.tap(None).unwrap();
            ns.attach(&tap, &bridge).unwrap();
            let out = ns.command("ip").args(["-br", "link"]).output().unwrap();
            let links = String::from_utf8_lossy(&out.stdout);
            assert!(links.contains(&tap) && links.contains(&bridge), "{links}");
            assert!(namespaces().contains(&ns.name));
            ns.name.clone()
        };
        assert!(
            !namespaces().contains(&name),
            "namespace {name} left behind"
        );
    }

    #[test]
    fn unique_names_fit_linux_limits_and_differ() {
        let a = unique_name("ntap");
        let b = unique_name("ntap");
        assert_ne!(a, b);
        assert!(a.len() <= 15 && b.len() <= 15);
    }
}
