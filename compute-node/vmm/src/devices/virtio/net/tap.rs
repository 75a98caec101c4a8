//! Attaching to an existing tap device (`/dev/net/tun`, `IFF_TAP |
//! IFF_NO_PI`, non-blocking). The tap must already exist: the node agent
//! creates it and puts it on a bridge; the VMM never creates interfaces.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;

/// Opening a tap failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenTapError {
    /// No such interface.
    #[error("tap device {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    Missing(String),
    /// The interface is not a tap.
    #[error("network interface {0} is not a tap device")]
    NotTap(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    Tun(#[source] std::io::Error),
    /// TUNSETIFF refused.
    #[error("cannot attach to tap device {0} (in use by another process, or not permitted)")]
    Attach(String, #[source] std::io::Error),
}

/// An attached tap.
#[derive(Debug)]
pub struct Tap {
    /// Interface name.
    pub name: String,
    file: File,
}

impl Tap {
    /// Attaches to the existing tap `name`.
    pub fn open(name: &str) -> Result<Self, OpenTapError> {
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(OpenTapError::Missing(name.to_owned()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(OpenTapError::NotTap(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(OpenTapError::Tun)?;
        // struct ifreq: 16-byte name, then the flags (a short) in the union.
        let mut ifr = [0u8; 40];
        let n = name.len().min(15);
        ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on
        // x86_64), which `ifr` is; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if ret < 0 {
            return Err(OpenTapError::Attach(
                name.to_owned(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    /// Another handle on the same tap queue (for a new boot).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            file: self.file.try_clone()?,
        })
    }

    /// Reads one frame (non-blocking).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (non-blocking).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// The fd, for epoll.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
