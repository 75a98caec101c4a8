//! The migration wire protocol: a TCP connection from source to target
//! (plus, from version 2, optional extra connections that carry memory
//! only), each a fixed header, then length-prefixed frames.
//!
//! ```text
//! source (neph-vmm, VM running)                 target (neph-vmm --incoming)
//!                                                   pre-builds the VM it expects
//!   connect ─────────────────────────────────────► accept (one connection)
//!   Header "NEPHMIG\0" + version ────────────────► accepts CURRENT or PREVIOUS
//!   Config {vcpus, memory, disks, nets, ...} ────► checks it against its own
//!                                                   --disk/--net, takes the
//!                                                   pre-built VM if it fits (or
//!                                                   builds one), starts its
//!                                                   threads parked, zeroes disks
//!                                        ◄──────── Ready {session, max_streams}
//!   [streams > 1: Streams {count} ──────────────►  accepts count - 1 more
//!    connect, Header, Join {session, i} ═════════►  connections, one reader
//!    on each extra stream]                           thread each]
//!   turn on dirty logs (KVM + VMM bitmap + disks)
//!   round 0: Pages/DiskChunks (zero pages skipped) ► writes into memory/disk
//!   rounds 1..: dirty Pages/ZeroPages/DiskChunks ─►  (auto-converge throttles
//!     (pages split across the streams)                the vCPUs if needed)
//!   each round ends with Sync on every stream ───►
//!                                        ◄──────── Synced (all streams applied)
//!   v3: once a round predicts a short enough
//!   stop-and-copy: SwitchoverGate (VM still
//!   running; yes = the switchover is decided,
//!   no cancel from here), more rounds until the
//!   prediction fits again
//!   pause vCPUs and devices
//!   last Pages/ZeroPages/DiskChunks (+ Sync on  ─►
//!     each extra stream), then on the first:
//!   State {vCPUs, VM, devices} ──────────────────► validates it
//!   Complete {memory checksum, if verifying} ────► waits for the extra streams,
//!     (v3: this is the commit)                      compares the checksum, loads
//!                                                   the state; v3: writes its
//!                                                   arrival file, wakes the vCPUs
//!                                        ◄──────── Loaded {target steps} (or Error)
//!   v3: exit 0 ("migrated")
//!   v2 only: SwitchoverGate, then Commit ────────► wakes the vCPUs
//!
//!   any failure or cancel before the gate's yes: Abort ► the target discards
//!   the stream and listens again, the source's VM runs on; after the yes
//!   and before Complete went out, the source resumes too (the target cannot
//!   run the VM without Complete); once Complete went out and no Loaded
//!   came back, the source is in doubt: its VM stays paused until
//!   `migrate_resolve` says where the VM runs (the node agent asks the
//!   controllers, which ask the target's agent, see `docs/migration.md`).
//! ```
//!
//! Frames: `kind: u8`, `len: u32` little-endian, `len` bytes of payload,
//! `len` at most [`MAX_FRAME`]. Structured payloads (Config, State) are
//! postcard; page and chunk payloads are raw (below). Everything a target
//! reads is untrusted: unknown kinds, oversized or truncated frames, page
//! addresses outside guest memory or unaligned, chunks outside the disk,
//! counts that do not divide the payload, and structures that do not fit
//! the VM are refused with a [`ProtocolError`] that names the problem.
//!
//! Versions: the target accepts [`VERSION`] and [`PREVIOUS_VERSION`]; a
//! change to any frame bumps [`VERSION`] and keeps reading the old one for
//! one release. Version 2 added the payloads of `Ready` ([`ReadyInfo`]) and
//! `Loaded` ([`LoadedReport`]) and the extra memory streams (`Streams`,
//! `Join`). Version 3 moved the switchover decision before the pause:
//! `Complete` is the commit and the target resumes on it, so the guest's
//! downtime no longer includes the gate (a round trip through the
//! controllers' Raft log); the `Commit` frame is version 2's only. A source
//! can be asked to speak version 2 (`migrate` with `"protocol": 2`) to move
//! a VM to an older target.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Magic at the start of a stream.
pub const MAGIC: [u8; 8] = *b"NEPHMIG\0";
/// Protocol version this build speaks.
pub const VERSION: u32 = 3;
/// The oldest version this build still accepts.
pub const PREVIOUS_VERSION: u32 = 2;
/// Largest frame payload.
pub const MAX_FRAME: u32 = 16 << 20;
/// Size of a page in `Pages` frames.
pub const PAGE_SIZE: usize = 4096;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → target: [`MigrationConfig`] (postcard).
    Config = 1,
    /// Source → target: repeated `gpa: u64 LE` + 4096 bytes.
    Pages = 2,
    /// Source → target: repeated `gpa: u64 LE` (pages now all zero).
    ZeroPages = 3,
    /// Source → target: `disk: u32 LE`, `offset: u64 LE`, then the bytes.
    DiskChunk = 4,
    /// Source → target: [`super::state::MachineState`] (postcard).
    State = 5,
    /// Source → target: [`Complete`] (postcard). From version 3 it is
    /// the commit: the source sends it only after its gate said yes, and
    /// the target runs the VM once it has loaded the state.
    Complete = 6,
    /// Source → target (version 2 only): the switchover is committed, run
    /// the VM.
    Commit = 7,
    /// Source → target: the migration is abandoned (UTF-8 reason).
    Abort = 8,
    /// Source → target: answer `Synced` once everything before is applied
    /// (ends each round, so the source measures the real end-to-end rate
    /// and never pauses the VM with a backlog in flight). On an extra
    /// memory stream it ends that stream's share of a round, unanswered.
    Sync = 9,
    /// Source → target (v2): [`StreamsInfo`], extra memory streams follow.
    Streams = 10,
    /// Extra stream → target (v2): [`JoinInfo`], its first frame.
    Join = 11,
    /// Target → source: the VM is built, send memory.
    Ready = 0x81,
    /// Target → source: the complete state is loaded (and verified); from
    /// version 3, the VM runs on the target.
    Loaded = 0x82,
    /// Target → source: the target failed (UTF-8 message).
    Error = 0x83,
    /// Target → source: everything up to the `Sync` is applied.
    Synced = 0x84,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Config,
            2 => Self::Pages,
            3 => Self::ZeroPages,
            4 => Self::DiskChunk,
            5 => Self::State,
            6 => Self::Complete,
            7 => Self::Commit,
            8 => Self::Abort,
            9 => Self::Sync,
            10 => Self::Streams,
            11 => Self::Join,
            0x81 => Self::Ready,
            0x82 => Self::Loaded,
            0x83 => Self::Error,
            0x84 => Self::Synced,
            _ => return None,
        })
    }
}

/// A malformed, hostile or broken stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or ended early.
    #[error("the migration connection failed")]
    Io(#[from] io::Error),
    /// Not a migration stream.
    #[error("the stream does not start with the migration magic")]
    Magic,
    /// A version this build does not speak.
    #[error(
        "protocol version {0} is not supported (this build accepts {PREVIOUS_VERSION} to {VERSION})"
    )]
    Version(u32),
    /// Unknown frame kind.
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    /// A frame over the limit.
    #[error("a frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    /// A frame that was not expected now.
    #[error("a {got:?} frame arrived where {expected} was expected")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What should have.
        expected: &'static str,
    },
    /// A payload that does not decode or fails a check.
    #[error("a {kind:?} frame is malformed: {reason}")]
    Malformed {
        /// Frame kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// The peer reported an error.
    #[error("the peer failed: {0}")]
    Peer(String),
    /// The peer gave up.
    #[error("the source abandoned the migration: {0}")]
    Aborted(String),
}

/// A disk as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Read-only.
    pub readonly: bool,
}

/// What the target needs to build a matching VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Disks, in order.
    pub disks: Vec<DiskInfo>,
    /// MAC of each network interface, in order (the guest keeps them).
    pub nets: Vec<[u8; 6]>,
    /// Whether an rng device is present.
    pub rng: bool,
    /// Kernel path and command line, for reboots after the move (the
    /// kernel must exist at the same path on the target to reboot).
    pub kernel: String,
    /// Initrd path, if any.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Boots the source has seen (the target continues the count).
    pub boots: u64,
}

/// The last frame before the target acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// FNV-style checksum of all guest memory at switchover, when the
    /// source was asked to verify (the target compares its own).
    pub memory_checksum: Option<u64>,
    /// Pages sent in total (for the target's report).
    pub pages_sent: u64,
}

/// The payload of a `Ready` frame (v2; empty in v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Names this migration: extra streams present it in their `Join`, so
    /// a stray connection cannot join it.
    pub session: u64,
    /// The most memory streams the target takes.
    pub max_streams: u8,
}

/// The payload of a `Streams` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamsInfo {
    /// Memory streams in all, this one included (2 or more).
    pub count: u8,
}

/// The payload of a `Join` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinInfo {
    /// The session from `Ready`.
    pub session: u64,
    /// Which extra stream this is (1 to count - 1).
    pub index: u8,
}

/// Most memory streams a migration uses.
pub const MAX_STREAMS: u8 = 8;

/// The payload of a `Loaded` frame: how long the target's steps took, for
/// the source's report. An empty payload (what a target of protocol
/// version 1 sends) means no report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedReport {
    /// The target's steps from the first switchover frame to `Loaded`.
    pub phases: Vec<super::Phase>,
}

/// Decodes a `Loaded` payload into the target's steps (none if empty).
pub fn decode_loaded(payload: &[u8]) -> Result<Vec<super::Phase>, ProtocolError> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let r: LoadedReport = decode(Kind::Loaded, payload)?;
    Ok(r.phases)
}

/// Writes the stream header.
pub fn write_header(w: &mut impl Write, version: u32) -> io::Result<()> {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&MAGIC);
    b[8..].copy_from_slice(&version.to_le_bytes());
    w.write_all(&b)
}

/// Reads and checks the stream header; returns the version.
pub fn read_header(r: &mut impl Read) -> Result<u32, ProtocolError> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)?;
    if b[..8] != MAGIC {
        return Err(ProtocolError::Magic);
    }
    let v = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if !(PREVIOUS_VERSION..=VERSION).contains(&v) {
        return Err(ProtocolError::Version(v));
    }
    Ok(v)
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut h = [0u8; 5];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)
}

/// Writes a postcard-encoded frame.
pub fn write_value<T: Serialize>(w: &mut impl Write, kind: Kind, value: &T) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    write_frame(w, kind, &bytes)
}

/// Reads one frame into `buf` (reused); returns its kind.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, ProtocolError> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)?;
    let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf)?;
    Ok(kind)
}

/// Decodes a postcard payload of a `kind` frame.
pub fn decode<'a, T: Deserialize<'a>>(kind: Kind, payload: &'a [u8]) -> Result<T, ProtocolError> {
    postcard::from_bytes(payload).map_err(|e| ProtocolError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

/// One record of a `Pages` frame.
pub const PAGE_RECORD: usize = 8 + PAGE_SIZE;

/// Splits a `Pages` payload into (gpa, page) records, checking each
/// address with `valid` (page-aligned, inside guest memory).
pub fn pages(
    payload: &[u8],
    valid: impl Fn(u64) -> bool,
) -> Result<Vec<(u64, &[u8])>, ProtocolError> {
    let bad = |reason: String| ProtocolError::Malformed {
        kind: Kind::Pages,
        reason,
    };
    if payload.is_empty() || !payload.len().is_multiple_of(PAGE_RECORD) {
        return Err(bad(format!(
            "{} bytes is not a whole number of {PAGE_RECORD}-byte page records",
            payload.len()
        )));
    }
    payload
        .chunks_exact(PAGE_RECORD)
        .map(|rec| {
            let gpa = u64::from_le_bytes(rec[..8].try_into().unwrap_or([0xff; 8]));
            if !valid(gpa) {
                return Err(bad(format!("page address {gpa:#x} is not a guest page")));
            }
            Ok((gpa, &rec[8..]))
        })
        .collect()
}

/// Splits a `ZeroPages` payload into addresses, each checked with `valid`.
pub fn zero_pages(payload: &[u8], valid: impl Fn(u64) -> bool) -> Result<Vec<u64>, ProtocolError> {
    let bad = |reason: String| ProtocolError::Malformed {
        kind: Kind::ZeroPages,
        reason,
    };
    if payload.is_empty() || !payload.len().is_multiple_of(8) {
        return Err(bad(format!(
            "{} bytes is not a list of addresses",
            payload.len()
        )));
    }
    payload
        .chunks_exact(8)
        .map(|b| {
            let gpa = u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8]));
            if valid(gpa) {
                Ok(gpa)
            } else {
                Err(bad(format!("page address {gpa:#x} is not a guest page")))
            }
        })
        .collect()
}

/// Encodes a `DiskChunk` payload.
pub fn disk_chunk(disk: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + data.len());
    p.extend_from_slice(&disk.to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(data);
    p
}

/// Decodes a `DiskChunk` payload, checking it against the disk sizes.
pub fn parse_disk_chunk<'a>(
    payload: &'a [u8],
    capacities: &[u64],
) -> Result<(usize, u64, &'a [u8]), ProtocolError> {
    let bad = |reason: String| ProtocolError::Malformed {
        kind: Kind::DiskChunk,
        reason,
    };
    if payload.len() < 12 {
        return Err(bad(format!(
            "{} bytes is shorter than its header",
            payload.len()
        )));
    }
    let disk = u32::from_le_bytes(payload[..4].try_into().unwrap_or([0xff; 4]));
    let offset = u64::from_le_bytes(payload[4..12].try_into().unwrap_or([0xff; 8]));
    let data = &payload[12..];
    let idx = usize::try_from(disk).unwrap_or(usize::MAX);
    let Some(&cap) = capacities.get(idx) else {
        return Err(bad(format!("disk {disk} does not exist")));
    };
    let end = offset.checked_add(data.len() as u64);
    if data.is_empty() || end.is_none_or(|e| e > cap) {
        return Err(bad(format!(
            "{} bytes at {offset} do not fit disk {disk} of {cap} bytes",
            data.len()
        )));
    }
    Ok((idx, offset, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_accepts_known_versions_only() {
        let mut b = Vec::new();
        write_header(&mut b, VERSION).unwrap();
        assert_eq!(read_header(&mut b.as_slice()).unwrap(), VERSION);
        let mut b = Vec::new();
        write_header(&mut b, VERSION + 1).unwrap();
        assert!(matches!(
            read_header(&mut b.as_slice()),
            Err(ProtocolError::Version(_))
        ));
        assert!(matches!(
            read_header(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(ProtocolError::Magic)
        ));
        assert!(matches!(
            read_header(&mut &MAGIC[..4]),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn the_previous_version_is_still_read() {
        assert_eq!((PREVIOUS_VERSION, VERSION), (2, 3));
        let mut b = Vec::new();
        write_header(&mut b, PREVIOUS_VERSION).unwrap();
        assert_eq!(read_header(&mut b.as_slice()).unwrap(), 2);
        // Two versions back is refused, as is version 0.
        for old in [0, 1] {
            let mut b = Vec::new();
            write_header(&mut b, old).unwrap();
            assert!(matches!(
                read_header(&mut b.as_slice()),
                Err(ProtocolError::Version(v)) if v == old
            ));
        }
        // An empty Loaded carries no report and is no error.
        assert!(decode_loaded(&[]).unwrap().is_empty());
    }

    #[test]
    fn version_2_payloads_round_trip_and_garbage_is_refused() {
        let mut b = Vec::new();
        let ready = ReadyInfo {
            session: 0xdead_beef_0bad_cafe,
            max_streams: MAX_STREAMS,
        };
        write_value(&mut b, Kind::Ready, &ready).unwrap();
        write_value(&mut b, Kind::Streams, &StreamsInfo { count: 3 }).unwrap();
        write_value(
            &mut b,
            Kind::Join,
            &JoinInfo {
                session: 7,
                index: 2,
            },
        )
        .unwrap();
        let report = LoadedReport {
            phases: vec![super::super::Phase {
                name: "restore".into(),
                us: 90,
            }],
        };
        write_value(&mut b, Kind::Loaded, &report).unwrap();
        let mut r = b.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Ready);
        assert_eq!(decode::<ReadyInfo>(Kind::Ready, &buf).unwrap(), ready);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Streams);
        assert_eq!(decode::<StreamsInfo>(Kind::Streams, &buf).unwrap().count, 3);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Join);
        assert_eq!(decode::<JoinInfo>(Kind::Join, &buf).unwrap().index, 2);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Loaded);
        assert_eq!(decode_loaded(&buf).unwrap(), report.phases);
        assert!(decode_loaded(&[0xff; 9]).is_err());
        assert!(decode::<ReadyInfo>(Kind::Ready, &[]).is_err());
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let mut b = Vec::new();
        write_frame(&mut b, Kind::Commit, b"").unwrap();
        write_value(
            &mut b,
            Kind::Complete,
            &Complete {
                memory_checksum: Some(7),
                pages_sent: 3,
            },
        )
        .unwrap();
        let mut r = b.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Commit);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Complete);
        let c: Complete = decode(Kind::Complete, &buf).unwrap();
        assert_eq!(c.memory_checksum, Some(7));
        // Unknown kind, oversized, truncated.
        assert!(matches!(
            read_frame(&mut &[0x42u8, 0, 0, 0, 0][..], &mut buf),
            Err(ProtocolError::UnknownKind(0x42))
        ));
        assert!(matches!(
            read_frame(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..], &mut buf),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[2u8, 10, 0, 0, 0, 1, 2][..], &mut buf),
            Err(ProtocolError::Io(_))
        ));
        assert!(decode::<Complete>(Kind::Complete, &[0xff; 3]).is_err());
    }

    #[test]
    fn page_records_are_checked() {
        let valid = |gpa: u64| gpa.is_multiple_of(4096) && gpa < 0x10_0000;
        let mut p = vec![0u8; PAGE_RECORD * 2];
        p[..8].copy_from_slice(&0x1000u64.to_le_bytes());
        p[PAGE_RECORD..PAGE_RECORD + 8].copy_from_slice(&0x2000u64.to_le_bytes());
        let recs = pages(&p, valid).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].0, 0x2000);
        p[..8].copy_from_slice(&0x1001u64.to_le_bytes());
        assert!(pages(&p, valid).is_err());
        p[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(pages(&p, valid).is_err());
        assert!(pages(&p[..PAGE_RECORD + 3], valid).is_err());
        assert!(pages(&[], valid).is_err());
        assert_eq!(
            zero_pages(&0x3000u64.to_le_bytes(), valid).unwrap(),
            vec![0x3000]
        );
        assert!(zero_pages(&[0; 7], valid).is_err());
    }

    #[test]
    fn disk_chunks_must_fit_their_disk() {
        let caps = [4096u64];
        let p = disk_chunk(0, 1024, &[1; 512]);
        assert_eq!(parse_disk_chunk(&p, &caps).unwrap().1, 1024);
        assert!(parse_disk_chunk(&disk_chunk(1, 0, &[1]), &caps).is_err());
        assert!(parse_disk_chunk(&disk_chunk(0, 4000, &[1; 512]), &caps).is_err());
        assert!(parse_disk_chunk(&disk_chunk(0, u64::MAX, &[1; 2]), &caps).is_err());
        assert!(parse_disk_chunk(&p[..8], &caps).is_err());
    }
}
