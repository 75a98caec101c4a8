//! What a VM is made of: [`VmConfig`] and its parts, with the parsers for the
//! command-line forms (`PATH[,readonly]`, `tap=NAME[,mac=MAC]`) and the
//! validation that runs before any guest does.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Fewest vCPUs a VM can have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a VM can have.
pub const MAX_VCPUS: u8 = 16;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Most guest memory, MiB (64 GiB).
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// PVH ELF or bzImage kernel.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs, 1 to 16.
    pub vcpus: u8,
    /// Guest memory, MiB, 128 to 65536.
    pub memory_mib: u64,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in PCI slot order after the disks.
    pub nets: Vec<NetConfig>,
    /// Where the serial console goes.
    pub console: ConsoleConfig,
    /// Unix socket of the control endpoint (see [`crate::api`]).
    pub api_socket: Option<PathBuf>,
    /// Whether to add a virtio-rng device (on by default).
    pub rng: bool,
}

impl VmConfig {
    /// A config with defaults (1 vCPU, 256 MiB, console on stdio, an rng).
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            nets: Vec::new(),
            console: ConsoleConfig::default(),
            api_socket: None,
            rng: true,
        }
    }

    /// Checks the values that need no file or device access.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(u64::from(self.vcpus)));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.cmdline.len() >= crate::arch::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.as_bytes().contains(&0) {
            return Err(ConfigError::CmdlineNul);
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.rng);
        if devices > crate::devices::pci::MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Where the serial console is connected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Append console output to this file instead of stdout (and take no
    /// input from stdin).
    pub log: Option<PathBuf>,
    /// Serve the console as a live two-way byte stream on this unix socket.
    pub socket: Option<PathBuf>,
}

/// A virtio-blk disk backed by a raw file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Refuse guest writes (the device offers VIRTIO_BLK_F_RO).
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH[,readonly]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, readonly) = match s.rsplit_once(',') {
            Some((path, "readonly")) | Some((path, "ro")) => (path, true),
            Some((_, opt)) if !opt.contains('/') => {
                return Err(ConfigError::DiskOption(opt.to_owned()));
            }
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::DiskPath);
        }
        Ok(Self {
            path: PathBuf::from(path),
            readonly,
        })
    }
}

/// A virtio-net interface backed by an existing tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Name of the tap device (it must exist).
    pub tap: String,
    /// MAC address the guest sees; derived from the tap name if absent.
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    /// The MAC the device offers: the configured one, or a stable
    /// locally-administered one derived from the tap name.
    pub fn effective_mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| {
            // FNV-1a of the name: stable across reboots of the same VM.
            let mut h: u32 = 0x811c_9dc5;
            for b in self.tap.bytes() {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
            let b = h.to_be_bytes();
            MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
        })
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) => tap = Some(name.to_owned()),
                Some(("mac", m)) => mac = Some(m.parse()?),
                _ => return Err(ConfigError::NetOption(part.to_owned())),
            }
        }
        let tap = tap.ok_or(ConfigError::NetTapMissing)?;
        // IFNAMSIZ is 16 including the NUL.
        if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
            return Err(ConfigError::TapName(tap));
        }
        Ok(Self { tap, mac })
    }
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 {
            // Trailing parts, or a multicast address.
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> Self {
        m.to_string()
    }
}

impl TryFrom<String> for MacAddr {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A configuration value is out of range or malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("{0} vCPUs requested; a VM has between 1 and 16")]
    Vcpus(u64),
    /// Memory size out of range.
    #[error("{0} MiB of memory requested; a VM has between 128 MiB and 65536 MiB (64 GiB)")]
    Memory(u64),
    /// Command line too long.
    #[error("the kernel command line is {0} bytes; at most 65535 fit")]
    CmdlineTooLong(usize),
    /// NUL in the command line.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Too many PCI devices.
    #[error("{0} PCI devices requested; bus 0 has room for 31 including the rng")]
    TooManyDevices(usize),
    /// Unknown disk option.
    #[error("unknown disk option `{0}`; the form is PATH[,readonly]")]
    DiskOption(String),
    /// Empty disk path.
    #[error("a disk needs a path; the form is PATH[,readonly]")]
    DiskPath,
    /// Unknown net option.
    #[error("unknown net option `{0}`; the form is tap=NAME[,mac=MAC]")]
    NetOption(String),
    /// No tap given.
    #[error("a net device needs a tap; the form is tap=NAME[,mac=MAC]")]
    NetTapMissing,
    /// Bad tap name.
    #[error("`{0}` is not a valid interface name (1 to 15 characters, no `/`)")]
    TapName(String),
    /// Bad MAC.
    #[error("`{0}` is not a unicast MAC address like 52:54:00:12:34:56")]
    Mac(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_forms_parse() {
        let d: DiskConfig = "/a/b.img".parse().unwrap();
        assert_eq!((d.path.to_str().unwrap(), d.readonly), ("/a/b.img", false));
        let d: DiskConfig = "/a/b.img,readonly".parse().unwrap();
        assert!(d.readonly);
        assert_eq!(
            "x.img,bogus".parse::<DiskConfig>(),
            Err(ConfigError::DiskOption("bogus".into()))
        );
        assert_eq!("".parse::<DiskConfig>(), Err(ConfigError::DiskPath));
    }

    #[test]
    fn net_forms_parse() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.unwrap().0, [0x52, 0x54, 0, 0, 0, 1]);
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=01:00:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=52:54:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap=waytoolongname0123".parse::<NetConfig>().is_err());
        let n: NetConfig = "tap=tap7".parse().unwrap();
        assert_eq!(n.effective_mac(), n.effective_mac());
        assert_eq!(
            n.effective_mac().0[0] & 3,
            2,
            "locally administered unicast"
        );
    }

    #[test]
    fn limits_are_checked() {
        let mut c = VmConfig::new("k");
        c.validate().unwrap();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 16;
        c.validate().unwrap();
        c.memory_mib = 64;
        assert_eq!(c.validate(), Err(ConfigError::Memory(64)));
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(c.validate().is_err());
        c.memory_mib = 256;
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineNul));
    }
}
