//! The bridge the local cluster's VMs plug their taps into: `nephdev0`
//! with the host address [`HOST_CIDR`], made with `ip` (root only) and
//! removed, with every tap still enslaved to it, by `neph dev down`.

use std::process::Command;

use thiserror::Error;

/// The bridge's name.
pub const BRIDGE: &str = "nephdev0";
/// The host's address on it; guests use the rest of the /24.
pub const HOST_CIDR: &str = "10.77.0.1/24";

/// Why the bridge could not be made or removed.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// `ip` could not be run.
    #[error("cannot run `ip` (install iproute2): {0}")]
    NoIp(std::io::Error),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

fn ip(args: &[&str]) -> Result<String, BridgeError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(BridgeError::NoIp)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BridgeError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether a link of that name exists.
pub fn exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).is_ok()
}

/// Makes the bridge (or takes over one left from an earlier run), gives it
/// the host address and brings it up.
pub fn create() -> Result<(), BridgeError> {
    if !exists(BRIDGE) {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    }
    let addrs = ip(&["-o", "addr", "show", "dev", BRIDGE])?;
    if !addrs.contains(HOST_CIDR) {
        ip(&["addr", "add", HOST_CIDR, "dev", BRIDGE])?;
    }
    ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// The interfaces enslaved to `bridge`.
fn ports(bridge: &str) -> Vec<String> {
    let Ok(out) = ip(&["-o", "link", "show", "master", bridge]) else {
        return Vec::new();
    };
    parse_link_names(&out)
}

/// Names from `ip -o link show` lines (`3: tap0@if2: <...> ...`).
fn parse_link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Deletes every interface left on `bridge` (the VMs' taps), then the
/// bridge. A bridge that is already gone is fine.
pub fn remove(bridge: &str) -> Result<Vec<String>, BridgeError> {
    if !exists(bridge) {
        return Ok(Vec::new());
    }
    let taps = ports(bridge);
    for t in &taps {
        // A tap whose VM just exited may vanish on its own meanwhile.
        if exists(t) {
            ip(&["link", "del", "dev", t])?;
        }
    }
    ip(&["link", "del", "dev", bridge])?;
    Ok(taps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_parsed_from_ip_output() {
        let out = "5: nt-web-1: <BROADCAST,MULTICAST,UP> mtu 1500 master nephdev0 state UP\n\
                   7: veth0@if6: <BROADCAST> mtu 1500 master nephdev0\n";
        assert_eq!(parse_link_names(out), vec!["nt-web-1", "veth0"]);
        assert!(parse_link_names("").is_empty());
    }
}
