//! One instance on disk: its name, its directory under
//! `<data-dir>/instances/<project>/<instance>/` and the files in it (the
//! `state` record, disk, sockets, logs), its tap and MAC, and preparing
//! them from the assignment and the image directory.
//!
//! ```text
//! <data-dir>/instances/<project>/<instance>/
//!   state          JSON VmRecord of the running neph-vmm (pid, boot_count, spec)
//!   disk.raw       the instance's disk (sparse, flavor size; seeded from a raw image)
//!   api.sock       neph-vmm control socket
//!   console.sock   neph-vmm console socket
//!   console.log    serial console, appended across restarts
//!   vmm.log        neph-vmm's stdout and stderr, appended
//! ```

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Version of the `state` file format.
pub const RECORD_VERSION: u32 = 1;
/// Longest unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A name that is not `projects/{project}/instances/{instance}`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseNameError {
    /// Wrong shape.
    #[error("{0:?} is not an instance name (projects/PROJECT/instances/INSTANCE)")]
    Shape(String),
    /// A part is not a DNS label.
    #[error("{0:?} is not a lowercase DNS label")]
    Label(String),
}

/// Whether `s` is a lowercase DNS label (RFC 1123): what every id in a
/// resource name is, and so safe as a path component.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `projects/{project}/instances/{instance}`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceName {
    /// Project id.
    pub project: String,
    /// Instance id.
    pub instance: String,
}

impl InstanceName {
    /// Parses and validates a resource name.
    pub fn parse(name: &str) -> Result<Self, ParseNameError> {
        let parts: Vec<&str> = name.split('/').collect();
        let [projects, project, instances, instance] = parts.as_slice() else {
            return Err(ParseNameError::Shape(name.to_owned()));
        };
        if *projects != "projects" || *instances != "instances" {
            return Err(ParseNameError::Shape(name.to_owned()));
        }
        for label in [project, instance] {
            if !is_dns_label(label) {
                return Err(ParseNameError::Label((*label).to_owned()));
            }
        }
        Ok(Self {
            project: (*project).to_owned(),
            instance: (*instance).to_owned(),
        })
    }

    /// The directory of this instance under `data_dir`.
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join("instances")
            .join(&self.project)
            .join(&self.instance)
    }

    /// The tap of this instance: `nt` and 10 hex digits of a hash of the
    /// name (interface names are at most 15 bytes).
    pub fn tap(&self) -> String {
        let h = Sha256::digest(self.to_string().as_bytes());
        let hex: String = h.iter().take(5).map(|b| format!("{b:02x}")).collect();
        format!("nt{hex}")
    }

    /// A stable, locally administered unicast MAC derived from the name,
    /// so the instance keeps it wherever it runs.
    pub fn mac(&self) -> String {
        let h = Sha256::digest(format!("mac:{self}").as_bytes());
        let first = (h[0] & 0xfe) | 0x02;
        format!(
            "{first:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            h[1], h[2], h[3], h[4], h[5]
        )
    }
}

impl std::fmt::Display for InstanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "projects/{}/instances/{}", self.project, self.instance)
    }
}

/// The files of one instance directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
}

impl Layout {
    /// The layout of `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &InstanceName) -> Self {
        Self {
            dir: name.dir(data_dir),
        }
    }
    /// `state`.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// `disk.raw`.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
    /// `api.sock`.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    /// `console.sock`.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// `console.log`.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// `vmm.log`.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// `arrived`: written by a `neph-vmm --incoming` just before the
    /// migrated VM first runs here.
    pub fn arrival(&self) -> PathBuf {
        self.dir.join("arrived")
    }

    /// Checks that the sockets' paths fit a unix socket address.
    pub fn check_socket_paths(&self) -> Result<(), PrepareError> {
        let longest = self.console_socket();
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(PrepareError::SocketPath(longest));
        }
        Ok(())
    }
}

/// How the VM was started: everything needed to start it again the same
/// way and to tell what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// `images/{image}`.
    pub image: String,
    /// Kernel (PVH ELF or bzImage).
    pub kernel: PathBuf,
    /// Initial ramdisk, if the image has one.
    pub initrd: Option<PathBuf>,
    /// Kernel command line, if the image has one.
    pub cmdline: Option<String>,
    /// vCPUs.
    pub vcpus: u64,
    /// Guest memory.
    pub memory_mib: u64,
    /// The instance's disk, if it has one.
    pub disk: Option<PathBuf>,
    /// Its tap, if the node has a bridge.
    pub tap: Option<String>,
    /// Its MAC.
    pub mac: String,
}

/// The `state` file: the `neph-vmm` process an agent started for an
/// instance. Untrusted when read back: checked against `/proc` and the
/// control socket before the VM is adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// `projects/{project}/instances/{instance}`.
    pub name: String,
    /// The `neph-vmm` process.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22), against pid reuse.
    pub start_ticks: u64,
    /// The instance's boot count the VM was started for.
    pub boot_count: u64,
    /// How it was started.
    pub spec: VmSpec,
    /// A `neph-vmm --incoming` (its control socket answers only once the
    /// VM has arrived).
    #[serde(default)]
    pub incoming: bool,
}

/// Reading or writing a `state` file failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// I/O.
    #[error("cannot access {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Not a record.
    #[error("{0} is not a valid state record")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// Another version.
    #[error("{path} has state record version {found}, this agent reads {RECORD_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

impl VmRecord {
    /// Writes the record atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        let io = |e| RecordError::Io(path.to_owned(), e);
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a record (at most 1 MiB).
    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let io = |e| RecordError::Io(path.to_owned(), e);
        let mut data = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(1 << 20)
            .read_to_end(&mut data)
            .map_err(io)?;
        let r: VmRecord =
            serde_json::from_slice(&data).map_err(|e| RecordError::Parse(path.to_owned(), e))?;
        if r.version != RECORD_VERSION {
            return Err(RecordError::Version {
                path: path.to_owned(),
                found: r.version,
            });
        }
        Ok(r)
    }
}

/// Preparing an instance to run failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The assignment lacks something.
    #[error("the assignment is incomplete: {0}")]
    Assignment(String),
    /// The image name is not `images/<dns-label>`.
    #[error("{0:?} is not a valid image name")]
    ImageName(String),
    /// A format this node cannot boot.
    #[error("image format {0:?} is not supported on this node (pvh-elf, bzimage, raw)")]
    Format(String),
    /// A file of the image is missing.
    #[error("the image file {0} is missing; place the image on this node first")]
    ImageFile(PathBuf),
    /// I/O while preparing.
    #[error("cannot prepare {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Socket paths too long.
    #[error("the socket path {0} is too long for a unix socket; use a shorter --data-dir")]
    SocketPath(PathBuf),
    /// A network command failed.
    #[error("cannot set up tap {tap}: {message}")]
    Tap {
        /// The tap.
        tap: String,
        /// What `ip` said.
        message: String,
    },
}

/// What an image directory holds for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    /// `kernel`.
    pub kernel: PathBuf,
    /// `initrd`, if present.
    pub initrd: Option<PathBuf>,
    /// The first line of `cmdline`, if present.
    pub cmdline: Option<String>,
    /// `disk.raw` for format `raw`.
    pub disk: Option<PathBuf>,
}

/// The id of image `name` (`images/{id}`, the id a DNS label), which names
/// its directory in the image directory.
pub fn image_id(name: &str) -> Option<&str> {
    name.strip_prefix("images/").filter(|id| is_dns_label(id))
}

/// Finds image `image` (`images/{id}`, format `format`) in `image_dir`.
pub fn image_files(
    image_dir: &Path,
    image: &str,
    format: &str,
) -> Result<ImageFiles, PrepareError> {
    let id = image_id(image).ok_or_else(|| PrepareError::ImageName(image.to_owned()))?;
    if !matches!(format, "pvh-elf" | "bzimage" | "raw") {
        return Err(PrepareError::Format(format.to_owned()));
    }
    let dir = image_dir.join(id);
    let kernel = dir.join("kernel");
    if !kernel.is_file() {
        return Err(PrepareError::ImageFile(kernel));
    }
    let initrd = Some(dir.join("initrd")).filter(|p| p.is_file());
    let cmdline = match std::fs::read_to_string(dir.join("cmdline")) {
        Ok(text) => text
            .lines()
            .next()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(PrepareError::Io(dir.join("cmdline"), e)),
    };
    let disk = if format == "raw" {
        let d = dir.join("disk.raw");
        if !d.is_file() {
            return Err(PrepareError::ImageFile(d));
        }
        Some(d)
    } else {
        None
    };
    Ok(ImageFiles {
        kernel,
        initrd,
        cmdline,
        disk,
    })
}

/// Creates the instance's disk at `path` unless it exists: a sparse file
/// of `size_gib`, holding a sparse copy of `seed` (a raw image) if given.
/// An existing disk smaller than `size_gib` (the instance was resized to a
/// flavor with more disk) grows to it, sparsely, its data kept; a disk
/// never shrinks. Returns `None` when the instance has no disk (no size,
/// no seed).
pub fn prepare_disk(
    path: &Path,
    size_gib: u64,
    seed: Option<&Path>,
) -> Result<Option<PathBuf>, PrepareError> {
    if path.exists() {
        grow_disk(path, size_gib.saturating_mul(1 << 30))?;
        return Ok(Some(path.to_owned()));
    }
    if size_gib == 0 && seed.is_none() {
        return Ok(None);
    }
    let tmp = path.with_extension("tmp");
    let io = |e| PrepareError::Io(path.to_owned(), e);
    let mut out = std::fs::File::create(&tmp).map_err(io)?;
    let mut len = 0u64;
    if let Some(seed) = seed {
        let mut src =
            std::fs::File::open(seed).map_err(|e| PrepareError::Io(seed.to_owned(), e))?;
        len = sparse_copy(&mut src, &mut out).map_err(io)?;
    }
    let want = size_gib.saturating_mul(1 << 30).max(len);
    out.set_len(want).map_err(io)?;
    out.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(Some(path.to_owned()))
}

/// Grows the disk at `path` to `want` bytes if it is smaller.
fn grow_disk(path: &Path, want: u64) -> Result<(), PrepareError> {
    let io = |e| PrepareError::Io(path.to_owned(), e);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len < want {
        f.set_len(want).map_err(io)?;
        f.sync_all().map_err(io)?;
        tracing::info!(disk = %path.display(), from = len, to = want, "disk grown to the flavor's size");
    }
    Ok(())
}

/// Copies `src` to `dst`, seeking over all-zero blocks so the copy stays
/// sparse. Returns the bytes copied (the caller sets the final length).
fn sparse_copy(src: &mut std::fs::File, dst: &mut std::fs::File) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(i64::try_from(n).unwrap_or(i64::MAX)))?;
        } else {
            dst.write_all(chunk)?;
        }
        total += n as u64;
    }
}

/// Creates tap `tap` (if missing), attaches it to `bridge` and brings it up.
pub async fn create_tap(tap: &str, bridge: &str) -> Result<(), PrepareError> {
    let exists = std::path::Path::new("/sys/class/net").join(tap).exists();
    if !exists {
        ip(tap, &["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    }
    ip(tap, &["link", "set", "dev", tap, "master", bridge]).await?;
    ip(tap, &["link", "set", "dev", tap, "up"]).await
}

/// Deletes tap `tap` if it exists.
pub async fn delete_tap(tap: &str) -> Result<(), PrepareError> {
    if !std::path::Path::new("/sys/class/net").join(tap).exists() {
        return Ok(());
    }
    ip(tap, &["link", "del", "dev", tap]).await
}

async fn ip(tap: &str, args: &[&str]) -> Result<(), PrepareError> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| PrepareError::Tap {
            tap: tap.to_owned(),
            message: format!("cannot run ip: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(PrepareError::Tap {
        tap: tap.to_owned(),
        message: format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// The last `max_bytes` of a file (empty if it does not exist).
pub fn tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut out = Vec::new();
    f.take(max_bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// The last lines of a log, for failure reasons (at most `max_bytes`).
pub fn tail_text(path: &Path, max_bytes: u64) -> String {
    let bytes = tail(path, max_bytes).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    // Start at a line boundary when the cut fell inside a line.
    match text.find('\n') {
        Some(i) if bytes.len() as u64 >= max_bytes => text[i + 1..].to_owned(),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_refuse_paths() {
        let n = InstanceName::parse("projects/p1/instances/web-1").unwrap();
        assert_eq!(n.project, "p1");
        assert_eq!(n.to_string(), "projects/p1/instances/web-1");
        assert_eq!(n.dir(Path::new("/d")), Path::new("/d/instances/p1/web-1"));
        for bad in [
            "",
            "projects/p1",
            "projects/../instances/x",
            "projects/p1/instances/..",
            "projects/p1/instances/a/b",
            "projects/P1/instances/x",
            "projects/p1/things/x",
            "projects/p1/instances/-x",
            "projects//instances/x",
        ] {
            assert!(InstanceName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn taps_and_macs_are_stable_and_valid() {
        let a = InstanceName::parse("projects/p1/instances/web-1").unwrap();
        let b = InstanceName::parse("projects/p1/instances/web-2").unwrap();
        assert_eq!(a.tap(), a.tap());
        assert_ne!(a.tap(), b.tap());
        assert!(a.tap().len() <= 15 && a.tap().starts_with("nt"));
        let mac = a.mac();
        assert_eq!(mac.len(), 17);
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 1, 0, "multicast MAC {mac}");
        assert_eq!(first & 2, 2, "not locally administered {mac}");
        assert_ne!(a.mac(), b.mac());
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        let r = VmRecord {
            version: RECORD_VERSION,
            name: "projects/p/instances/i".into(),
            pid: 42,
            start_ticks: 7,
            boot_count: 3,
            spec: VmSpec {
                image: "images/g".into(),
                kernel: "/k".into(),
                initrd: None,
                cmdline: Some("x=1".into()),
                vcpus: 1,
                memory_mib: 128,
                disk: None,
                tap: None,
                mac: "02:00:00:00:00:01".into(),
            },
            incoming: false,
        };
        r.save(&p).unwrap();
        assert_eq!(VmRecord::load(&p).unwrap(), r);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(VmRecord::load(&p), Err(RecordError::Parse(..))));
        let mut v = serde_json::to_value(&r).unwrap();
        v["version"] = 99.into();
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(matches!(
            VmRecord::load(&p),
            Err(RecordError::Version { .. })
        ));
    }

    #[test]
    fn images_are_found_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("g");
        std::fs::create_dir(&img).unwrap();
        assert!(matches!(
            image_files(d.path(), "images/g", "pvh-elf"),
            Err(PrepareError::ImageFile(_))
        ));
        std::fs::write(img.join("kernel"), b"elf").unwrap();
        std::fs::write(img.join("cmdline"), "ip=10.0.0.2/24\nignored\n").unwrap();
        let f = image_files(d.path(), "images/g", "pvh-elf").unwrap();
        assert_eq!(f.cmdline.as_deref(), Some("ip=10.0.0.2/24"));
        assert_eq!(f.initrd, None);
        assert!(matches!(
            image_files(d.path(), "images/../g", "pvh-elf"),
            Err(PrepareError::ImageName(_))
        ));
        assert!(matches!(
            image_files(d.path(), "images/g", "qcow2"),
            Err(PrepareError::Format(_))
        ));
        assert!(matches!(
            image_files(d.path(), "images/g", "raw"),
            Err(PrepareError::ImageFile(_))
        ));
    }

    #[test]
    fn disks_are_sparse_copies_of_the_seed() {
        let d = tempfile::tempdir().unwrap();
        let seed = d.path().join("seed");
        let mut data = vec![0u8; 3 << 20];
        data[..5].copy_from_slice(b"hello");
        data[(2 << 20) + 7] = 9;
        std::fs::write(&seed, &data).unwrap();
        let disk = d.path().join("disk.raw");
        let got = prepare_disk(&disk, 1, Some(&seed)).unwrap().unwrap();
        let meta = std::fs::metadata(&got).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        let back = std::fs::read(&got).unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        use std::os::unix::fs::MetadataExt as _;
        assert!(
            meta.blocks() * 512 < 8 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        // An existing disk keeps its data (the seed is not copied again)
        // and grows to a larger flavor's size, still sparse; it never
        // shrinks.
        std::fs::write(&disk, b"mine").unwrap();
        prepare_disk(&disk, 0, Some(&seed)).unwrap();
        assert_eq!(std::fs::read(&disk).unwrap(), b"mine");
        prepare_disk(&disk, 2, Some(&seed)).unwrap();
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 2 << 30);
        assert!(meta.blocks() * 512 < 1 << 20, "grown, not sparse");
        let mut head = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open(&disk).unwrap(), &mut head).unwrap();
        assert_eq!(&head, b"mine");
        prepare_disk(&disk, 1, None).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 << 30);
        assert_eq!(prepare_disk(&d.path().join("none"), 0, None).unwrap(), None);
    }

    #[test]
    fn tails_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        assert!(tail(&p, 10).unwrap().is_empty());
        std::fs::write(&p, b"line one\nline two\nline three\n").unwrap();
        assert_eq!(tail(&p, 6).unwrap(), b"three\n");
        assert_eq!(tail_text(&p, 16), "line three");
        assert_eq!(tail_text(&p, 1000), "line one\nline two\nline three");
    }
}
