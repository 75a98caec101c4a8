//! Dropping privileges once everything that needs them is open.
//!
//! Started as root, `neph-vmm` opens `/dev/kvm`, its taps (`TUNSETIFF`
//! needs `CAP_NET_ADMIN`), its disks, the console log and binds its
//! sockets, joins its cgroup, and then [`drop_to`] the configured user:
//! supplementary groups cleared, real, effective and saved gid and uid set,
//! the capability bounding set and ambient set emptied, no_new_privs set.
//! What the VMM still does afterwards needs no privilege: ioctls on the
//! open KVM, VM, vCPU and tap descriptors, I/O on open disks and sockets,
//! outbound TCP for a migration. What still needs file permissions for
//! that user: reading the kernel and initrd again at a reboot, and
//! removing the socket files at exit (left behind otherwise; the next
//! bind replaces them).

use std::ffi::CString;

/// Who to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: libc::uid_t,
    /// Group id.
    pub gid: libc::gid_t,
}

/// Resolving `--user` or dropping to it failed.
#[derive(Debug, thiserror::Error)]
pub enum DropPrivilegesError {
    /// Neither a known user nor `UID[:GID]`.
    #[error("unknown user {0:?}: give a user name or UID[:GID]")]
    UnknownUser(String),
    /// Not root, and asked to become someone else.
    #[error("cannot switch to uid {0}: neph-vmm is not running as root")]
    NotRoot(libc::uid_t),
    /// A call failed.
    #[error("cannot drop privileges: {0} failed")]
    Call(&'static str, #[source] std::io::Error),
    /// The result is not what was asked.
    #[error("privileges were not fully dropped: {0}")]
    Incomplete(String),
}

impl std::str::FromStr for Credentials {
    type Err = DropPrivilegesError;
    /// `NAME` (its uid and primary group), `UID` (gid = uid) or `UID:GID`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DropPrivilegesError::UnknownUser(s.to_owned());
        if let Some((u, g)) = s.split_once(':') {
            return Ok(Self {
                uid: u.parse().map_err(|_| unknown())?,
                gid: g.parse().map_err(|_| unknown())?,
            });
        }
        if let Ok(uid) = s.parse::<libc::uid_t>() {
            return Ok(Self { uid, gid: uid });
        }
        let name = CString::new(s).map_err(|_| unknown())?;
        // SAFETY: zeroed passwd is a valid out-parameter; getpwnam_r
        // writes into it and into buf, of the length given.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; name is NUL-terminated.
        let r = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        if r != 0 || out.is_null() {
            return Err(unknown());
        }
        Ok(Self {
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        })
    }
}

fn check(name: &'static str, r: libc::c_int) -> Result<(), DropPrivilegesError> {
    if r == 0 {
        Ok(())
    } else {
        Err(DropPrivilegesError::Call(
            name,
            std::io::Error::last_os_error(),
        ))
    }
}

/// Becomes `to` for good (every thread: glibc applies uid and gid changes
/// process-wide). Not root: allowed only if already `to` (then it only sets
/// no_new_privs).
pub fn drop_to(to: Credentials) -> Result<(), DropPrivilegesError> {
    // SAFETY: these getters have no preconditions.
    let (euid, uid, gid) = unsafe { (libc::geteuid(), libc::getuid(), libc::getgid()) };
    if euid != 0 {
        if uid != to.uid || gid != to.gid {
            return Err(DropPrivilegesError::NotRoot(to.uid));
        }
    } else {
        // The bounding set: no capability can ever come back, even
        // through an exec (which the seccomp filters forbid anyway).
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
            .unwrap_or(40);
        for cap in 0..=last {
            // SAFETY: PR_CAPBSET_DROP takes a capability number.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            // EINVAL: a capability this kernel does not know.
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                check("PR_CAPBSET_DROP", r)?;
            }
        }
        // SAFETY: clears the ambient set; no pointers.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        check("PR_CAP_AMBIENT_CLEAR_ALL", r)?;
        // SAFETY: an empty group list (null with length 0).
        check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
        // SAFETY: integer arguments only.
        check("setresgid", unsafe {
            libc::setresgid(to.gid, to.gid, to.gid)
        })?;
        // SAFETY: integer arguments only. With every uid non-zero the
        // kernel clears the permitted and effective capability sets.
        check("setresuid", unsafe {
            libc::setresuid(to.uid, to.uid, to.uid)
        })?;
    }
    // SAFETY: integer arguments only.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    verify(to)
}

/// Checks the calling thread's credentials and capabilities.
fn verify(to: Credentials) -> Result<(), DropPrivilegesError> {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(|e| DropPrivilegesError::Call("reading /proc/thread-self/status", e))?;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let ok = match key {
            "Uid" => value.split_whitespace().all(|v| v == to.uid.to_string()),
            "Gid" => value.split_whitespace().all(|v| v == to.gid.to_string()),
            "Groups" => to.uid == 0 || value.is_empty(),
            "CapInh" | "CapPrm" | "CapEff" | "CapAmb" => {
                to.uid == 0 || value.trim_start_matches('0').is_empty()
            }
            "NoNewPrivs" => value == "1",
            _ => true,
        };
        if !ok {
            return Err(DropPrivilegesError::Incomplete(format!("{key} is {value}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse() {
        assert_eq!(
            "1000:100".parse::<Credentials>().unwrap(),
            Credentials {
                uid: 1000,
                gid: 100
            }
        );
        assert_eq!(
            "65534".parse::<Credentials>().unwrap(),
            Credentials {
                uid: 65534,
                gid: 65534
            }
        );
        assert_eq!("root".parse::<Credentials>().unwrap().uid, 0);
        assert!("no-such-user-here".parse::<Credentials>().is_err());
        assert!("1:x".parse::<Credentials>().is_err());
    }
}
