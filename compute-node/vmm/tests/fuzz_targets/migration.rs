//! A hostile migration stream, read the way a target reads one: the header,
//! then `Config`, then memory, disk, `Streams`, `Sync`, `State` and
//! `Complete` frames in any order, then (version 2) `Commit`; or, on an extra memory
//! stream, `Join` and then pages. Every frame goes through the decoders the
//! target uses (`protocol::read_header`, `read_frame`, `decode`, `pages`,
//! `zero_pages`, `parse_disk_chunk`, `MachineState::validate`, and the
//! checks `VmConfig::validate` makes of the source's machine). Pages are
//! written into a 1 MiB guest memory standing in for the VM's; building
//! the VM and writing disks (what the real receiver does next) need KVM and
//! files and are left to the hostile-stream test in
//! `integration-tests/tests/migration.rs`. The properties: no panic, no
//! allocation beyond one frame's limit, and a stream is taken only when it
//! ran to its commit (`Complete` from version 3, `Commit` in version 2);
//! anything truncated, oversized, out of order or
//! malformed is refused with an error.

use std::path::PathBuf;

use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use neph_vmm::config::{ConsoleConfig, DiskConfig, MacAddr, NetConfig, VmConfig};
use neph_vmm::devices::serial::SerialSavedState;
use neph_vmm::migration::protocol::{
    self, Complete, DiskInfo, JoinInfo, Kind, MigrationConfig, ProtocolError, StreamsInfo,
};
use neph_vmm::migration::state::{
    DevicesState, FpuImage, FpuState, MachineState, STATE_VERSION, VcpuState, VmWideState,
};
use neph_vmm::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The stand-in guest memory.
const MEM_BYTES: usize = 0x10_0000;
const MEM: u64 = MEM_BYTES as u64;

fn malformed(kind: Kind, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        reason: reason.into(),
    }
}

fn unexpected(got: Kind, expected: &'static str) -> ProtocolError {
    ProtocolError::Unexpected { got, expected }
}

/// Whether `gpa` starts a whole page of `mem` (as the target checks).
fn page_ok(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    gpa.is_multiple_of(protocol::PAGE_SIZE as u64)
        && gpa
            .checked_add(protocol::PAGE_SIZE as u64 - 1)
            .is_some_and(|end| mem.address_in_range(GuestAddress(end)))
}

/// The machine the source describes, with stand-in backends, as the
/// target builds its config.
fn vm_config(cfg: &MigrationConfig) -> VmConfig {
    VmConfig {
        kernel: PathBuf::from(&cfg.kernel),
        initrd: cfg.initrd.as_ref().map(PathBuf::from),
        cmdline: cfg.cmdline.clone(),
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        disks: cfg
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: PathBuf::from("disk"),
                readonly: d.readonly,
            })
            .collect(),
        nets: cfg
            .nets
            .iter()
            .map(|mac| NetConfig {
                tap: "tap".into(),
                mac: Some(MacAddr(*mac)),
            })
            .collect(),
        console: ConsoleConfig::default(),
        api_socket: None,
        rng: cfg.rng,
    }
}

/// Reads a whole stream; `Ok` with the bytes it read (up to and including
/// the commit: `Complete` from version 3, `Commit` in version 2; the rest
/// of the input is never looked at) when it ran to its commit.
pub fn receive(stream: &[u8]) -> Result<usize, ProtocolError> {
    let mut r = stream;
    let version = protocol::read_header(&mut r)?;
    let mut buf = Vec::new();
    let kind = protocol::read_frame(&mut r, &mut buf)?;
    if kind == Kind::Join {
        return extra_stream(r, &buf);
    }
    if kind != Kind::Config {
        return Err(unexpected(kind, "Config"));
    }
    let cfg: MigrationConfig = protocol::decode(kind, &buf)?;
    vm_config(&cfg)
        .validate()
        .map_err(|e| malformed(kind, e.to_string()))?;
    let capacities: Vec<u64> = cfg.disks.iter().map(|d| d.capacity).collect();
    let virtio = cfg.disks.len() + cfg.nets.len() + usize::from(cfg.rng);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
        .expect("1 MiB of anonymous memory");
    let valid = |gpa: u64| page_ok(&mem, gpa);
    let zero = [0u8; protocol::PAGE_SIZE];
    let mut machine: Option<MachineState> = None;
    let mut rounds = 0u32;
    loop {
        let kind = protocol::read_frame(&mut r, &mut buf)?;
        match kind {
            Kind::Pages => {
                for (gpa, page) in protocol::pages(&buf, valid)? {
                    mem.write_slice(page, GuestAddress(gpa))
                        .map_err(|e| malformed(kind, e.to_string()))?;
                }
            }
            Kind::ZeroPages => {
                for gpa in protocol::zero_pages(&buf, valid)? {
                    mem.write_slice(&zero, GuestAddress(gpa))
                        .map_err(|e| malformed(kind, e.to_string()))?;
                }
            }
            Kind::Streams if version >= 2 && rounds == 0 => {
                let info: StreamsInfo = protocol::decode(kind, &buf)?;
                if !(2..=protocol::MAX_STREAMS).contains(&info.count) {
                    return Err(malformed(kind, "stream count out of range"));
                }
            }
            Kind::Sync => rounds = rounds.saturating_add(1),
            Kind::DiskChunk => {
                let (disk, offset, data) = protocol::parse_disk_chunk(&buf, &capacities)?;
                assert!(disk < capacities.len());
                assert!(offset + data.len() as u64 <= capacities[disk]);
            }
            Kind::State => {
                let s: MachineState = protocol::decode(kind, &buf)?;
                s.validate(cfg.vcpus, virtio)
                    .map_err(|e| malformed(kind, e.to_string()))?;
                machine = Some(s);
            }
            Kind::Complete => {
                let _: Complete = protocol::decode(kind, &buf)?;
                if machine.is_none() {
                    return Err(malformed(kind, "the machine state has not been sent"));
                }
                if version >= 3 {
                    return Ok(stream.len() - r.len());
                }
                let kind = protocol::read_frame(&mut r, &mut buf)?;
                return match kind {
                    Kind::Commit => Ok(stream.len() - r.len()),
                    Kind::Abort => Err(ProtocolError::Aborted(
                        String::from_utf8_lossy(&buf).into_owned(),
                    )),
                    other => Err(unexpected(other, "Commit")),
                };
            }
            Kind::Abort => {
                return Err(ProtocolError::Aborted(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            other => return Err(unexpected(other, "memory, disk or state")),
        }
    }
}

/// An extra memory stream after its `Join`: pages and syncs to its end.
fn extra_stream(mut r: &[u8], join: &[u8]) -> Result<usize, ProtocolError> {
    let info: JoinInfo = protocol::decode(Kind::Join, join)?;
    if info.index == 0 || info.index >= protocol::MAX_STREAMS {
        return Err(malformed(Kind::Join, "stream index out of range"));
    }
    let mut buf = Vec::new();
    let valid = |gpa: u64| gpa.is_multiple_of(protocol::PAGE_SIZE as u64) && gpa < MEM;
    loop {
        let kind = protocol::read_frame(&mut r, &mut buf)?;
        match kind {
            Kind::Pages => drop(protocol::pages(&buf, valid)?),
            Kind::ZeroPages => drop(protocol::zero_pages(&buf, valid)?),
            Kind::Sync => {}
            Kind::Abort => {
                return Err(ProtocolError::Aborted(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            other => return Err(unexpected(other, "pages on an extra stream")),
        }
    }
}

/// Fuzz target `migration_stream`. Also decodes the whole input as each
/// reply payload a source reads (`Loaded`) and as each structure.
pub fn stream_target(data: &[u8]) {
    if let Ok(read) = receive(data) {
        // A stream is only taken whole: cut short, it is refused.
        assert!(read > protocol::MAGIC.len() && read <= data.len());
        assert!(
            receive(&data[..read - 1]).is_err(),
            "a truncated stream was taken"
        );
    }
    let _ = protocol::decode_loaded(data);
    let _ = protocol::decode::<MigrationConfig>(Kind::Config, data);
    let _ = protocol::decode::<MachineState>(Kind::State, data).map(|s| s.validate(1, 1));
}

/// A machine state that passes `validate(1, 0)`.
pub fn machine_state() -> MachineState {
    let irqchip = |chip_id| kvm_bindings::kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    MachineState {
        version: STATE_VERSION,
        paused: false,
        vcpus: vec![VcpuState {
            id: 0,
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            fpu: FpuImage::Legacy(FpuState {
                fpr: vec![[0; 16]; 8],
                fcw: 0x37f,
                fsw: 0,
                ftwx: 0,
                last_opcode: 0,
                last_ip: 0,
                last_dp: 0,
                xmm: vec![[0; 16]; 16],
                mxcsr: 0x1f80,
            }),
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![(0x10, 1)],
            events: None,
            tsc_khz: 1_000_000,
        }],
        vm: VmWideState {
            irqchips: vec![
                irqchip(KVM_IRQCHIP_PIC_MASTER),
                irqchip(KVM_IRQCHIP_PIC_SLAVE),
                irqchip(KVM_IRQCHIP_IOAPIC),
            ],
            pit: Default::default(),
            clock: Default::default(),
            saved_at_unix_ns: 1,
        },
        devices: DevicesState {
            serial: SerialSavedState {
                baud_divisor: [1, 0],
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 0,
                modem_status: 0,
                scratch: 0,
                fifo: Vec::new(),
                pending: Vec::new(),
            },
            virtio: Vec::new(),
        },
    }
}

/// A stream of 1 vCPU and 128 MiB: a page, a zero page, a round, the
/// state, `Complete` and in version 2 `Commit` (a whole stream a target
/// takes); with
/// `disk`, a disk too and a chunk of it, and it stops after the round
/// (a saved state would need the disk's virtio state).
pub fn valid_stream(version: u32, disk: bool) -> Vec<u8> {
    let disks = if disk {
        vec![DiskInfo {
            capacity: 4096,
            readonly: false,
        }]
    } else {
        Vec::new()
    };
    let cfg = MigrationConfig {
        vcpus: 1,
        memory_mib: 128,
        disks,
        nets: Vec::new(),
        rng: false,
        kernel: "vmlinux".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        boots: 1,
    };
    let mut s = Vec::new();
    let w = &mut s;
    protocol::write_header(w, version).expect("to a vector");
    protocol::write_value(w, Kind::Config, &cfg).expect("to a vector");
    let mut page = vec![0u8; protocol::PAGE_RECORD];
    page[..8].copy_from_slice(&0x1000u64.to_le_bytes());
    page[8..].fill(0x5a);
    protocol::write_frame(w, Kind::Pages, &page).expect("to a vector");
    protocol::write_frame(w, Kind::ZeroPages, &0x2000u64.to_le_bytes()).expect("to a vector");
    if disk {
        let chunk = protocol::disk_chunk(0, 512, &[7; 512]);
        protocol::write_frame(w, Kind::DiskChunk, &chunk).expect("to a vector");
        protocol::write_frame(w, Kind::Sync, b"").expect("to a vector");
        return s;
    }
    protocol::write_frame(w, Kind::Sync, b"").expect("to a vector");
    protocol::write_value(w, Kind::State, &machine_state()).expect("to a vector");
    let complete = Complete {
        memory_checksum: None,
        pages_sent: 2,
    };
    protocol::write_value(w, Kind::Complete, &complete).expect("to a vector");
    if version < 3 {
        protocol::write_frame(w, Kind::Commit, b"").expect("to a vector");
    }
    s
}

/// An extra stream: `Join`, a page, `Sync`, `Abort`.
fn extra_seed() -> Vec<u8> {
    let mut s = Vec::new();
    protocol::write_header(&mut s, protocol::VERSION).expect("to a vector");
    let join = JoinInfo {
        session: 7,
        index: 1,
    };
    protocol::write_value(&mut s, Kind::Join, &join).expect("to a vector");
    protocol::write_frame(&mut s, Kind::ZeroPages, &0u64.to_le_bytes()).expect("to a vector");
    protocol::write_frame(&mut s, Kind::Sync, b"").expect("to a vector");
    protocol::write_frame(&mut s, Kind::Abort, b"cancelled").expect("to a vector");
    s
}

/// Complete streams of both versions, and an extra stream.
pub fn seeds() -> Vec<Vec<u8>> {
    vec![
        valid_stream(protocol::VERSION, false),
        valid_stream(protocol::PREVIOUS_VERSION, false),
        valid_stream(protocol::VERSION, true),
        extra_seed(),
    ]
}
