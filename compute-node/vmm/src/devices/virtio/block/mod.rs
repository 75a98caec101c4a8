//! virtio-blk backed by a raw image file (or block device): read, write,
//! flush (`fdatasync`), get-id; an optional read-only mode (offered as
//! `VIRTIO_BLK_F_RO`, writes fail with `IOERR`). Every request is checked
//! against the disk's size; out-of-range or misaligned requests complete with
//! `IOERR` while the queue keeps running, malformed chains stop the device.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::queue::{self, QueueError};
use super::segments::Segments;
use super::{Activation, DeviceMetrics, TYPE_BLOCK, VIRTIO_F_VERSION_1, VirtioDevice};

/// Sector size.
pub const SECTOR: u64 = 512;
const QUEUE_SIZES: &[u16] = &[256];
const SEG_MAX: u32 = 126;
const MAX_REQUEST_BYTES: u64 = 8 << 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;

/// Opening a disk image failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    /// The file cannot be opened.
    #[error("cannot open disk {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file or block device.
    #[error("disk {0} is not a regular file or block device")]
    Kind(PathBuf),
    /// Another process holds it.
    #[error("disk {0} is in use by another process (it is locked)")]
    Locked(PathBuf),
    /// Smaller than one sector.
    #[error("disk {0} is smaller than one 512-byte sector")]
    Empty(PathBuf),
}

/// An opened disk image.
#[derive(Debug)]
pub struct DiskBackend {
    /// Its path.
    pub path: PathBuf,
    file: File,
    /// Read-only.
    pub readonly: bool,
    /// Size in bytes (whole sectors).
    pub capacity: u64,
}

impl DiskBackend {
    /// Opens and locks `path` (shared lock when read-only, exclusive else).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, OpenDiskError> {
        let open_err = |source| OpenDiskError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(OpenDiskError::Kind(path.to_owned()));
        }
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(OpenDiskError::Locked(path.to_owned()));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let capacity = size / SECTOR * SECTOR;
        if capacity == 0 {
            return Err(OpenDiskError::Empty(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            readonly,
            capacity,
        })
    }

    /// Another handle on the same open file (for a new boot).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            path: self.path.clone(),
            file: self.file.try_clone()?,
            readonly: self.readonly,
            capacity: self.capacity,
        })
    }
}

/// The block device.
#[derive(Debug)]
pub struct Block {
    disk: DiskBackend,
    id: [u8; ID_BYTES],
    config: [u8; 24],
    active: Option<Activation>,
    metrics: DeviceMetrics,
    write_log: Option<Arc<super::WriteLog>>,
}

impl Block {
    /// A device over `disk`.
    pub fn new(disk: DiskBackend) -> Self {
        let mut id = [0u8; ID_BYTES];
        let name = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(disk.capacity / SECTOR).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            disk,
            id,
            config,
            active: None,
            metrics: DeviceMetrics::default(),
            write_log: None,
        }
    }

    /// Handles one request; returns the status and bytes written to the
    /// guest (before the status byte).
    fn request(
        &mut self,
        mem: &vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>,
        head: u16,
        r: &Segments,
        w: &Segments,
    ) -> Result<(u8, u64), QueueError> {
        let mut hdr = [0u8; 16];
        if !r.read(mem, 0, &mut hdr) {
            return Err(QueueError::Layout {
                head,
                reason: "a block request has no 16-byte header",
            });
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        // The status byte is the last writable byte.
        let data_in = w.len() - 1;
        let data_out = r.len() - 16;
        let range = |len: u64| {
            let start = sector.checked_mul(SECTOR)?;
            let end = start.checked_add(len)?;
            (len.is_multiple_of(SECTOR) && len <= MAX_REQUEST_BYTES && end <= self.disk.capacity)
                .then_some(start)
        };
        match kind {
            T_IN => {
                let Some(start) = range(data_in) else {
                    return Ok((S_IOERR, 0));
                };
                let mut pos = start;
                for (addr, len) in w.pieces(0, data_in) {
                    let ok = self.disk.file.seek(SeekFrom::Start(pos)).is_ok()
                        && mem
                            .read_exact_volatile_from(
                                GuestAddress(addr),
                                &mut self.disk.file,
                                usize::try_from(len).unwrap_or(usize::MAX),
                            )
                            .is_ok();
                    if !ok {
                        return Ok((S_IOERR, 0));
                    }
                    pos += len;
                }
                self.metrics.read_ops += 1;
                self.metrics.read_bytes += data_in;
                Ok((S_OK, data_in))
            }
            T_OUT => {
                if self.disk.readonly {
                    return Ok((S_IOERR, 0));
                }
                let Some(start) = range(data_out) else {
                    return Ok((S_IOERR, 0));
                };
                let mut pos = start;
                // The header's 16 bytes come first in the readable stream.
                let mut pieces = r.pieces(16, data_out);
                pieces.retain(|p| p.1 > 0);
                for (addr, len) in pieces {
                    let ok = self.disk.file.seek(SeekFrom::Start(pos)).is_ok()
                        && mem
                            .write_all_volatile_to(
                                GuestAddress(addr),
                                &mut self.disk.file,
                                usize::try_from(len).unwrap_or(usize::MAX),
                            )
                            .is_ok();
                    // Logged after the write (even a failed one, which may
                    // have written part): a migration that reads the chunk
                    // before this sees the bit again next round.
                    if let Some(log) = &self.write_log {
                        log.set_addr_range(
                            usize::try_from(pos).unwrap_or(usize::MAX),
                            usize::try_from(len).unwrap_or(usize::MAX),
                        );
                    }
                    if !ok {
                        return Ok((S_IOERR, 0));
                    }
                    pos += len;
                }
                self.metrics.write_ops += 1;
                self.metrics.write_bytes += data_out;
                Ok((S_OK, 0))
            }
            T_FLUSH => {
                self.metrics.flushes += 1;
                if self.disk.readonly || self.disk.file.sync_data().is_ok() {
                    Ok((S_OK, 0))
                } else {
                    Ok((S_IOERR, 0))
                }
            }
            T_GET_ID => {
                let n = usize::try_from(data_in).unwrap_or(usize::MAX).min(ID_BYTES);
                if !w.write(mem, 0, &self.id[..n]) {
                    return Err(QueueError::Memory { head });
                }
                Ok((S_OK, n as u64))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        let ro = if self.disk.readonly { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_SEG_MAX | F_FLUSH | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn process_queue(&mut self, index: usize) -> Result<(), QueueError> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let result = self.drain(&mut a, index);
        self.active = Some(a);
        result
    }
    fn set_write_log(&mut self, log: Option<Arc<super::WriteLog>>) {
        self.write_log = log;
    }
    fn queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }
    fn queues_mut(&mut self) -> Option<&mut [virtio_queue::Queue]> {
        self.active.as_mut().map(|a| a.queues.as_mut_slice())
    }
    fn metrics(&self) -> DeviceMetrics {
        self.metrics.clone()
    }
}

impl Block {
    fn drain(&mut self, a: &mut Activation, index: usize) -> Result<(), QueueError> {
        let Some(q) = a.queues.get_mut(index) else {
            return Ok(());
        };
        if !virtio_queue::QueueT::ready(q) {
            return Ok(());
        }
        let mut used_any = false;
        let max = SEG_MAX as usize + 2;
        while let Some(chain) = queue::pop(q, &a.mem, max)? {
            let head = chain.head;
            let (r, w) = Segments::split(&chain.descs).ok_or(QueueError::Layout {
                head,
                reason: "a device-readable buffer follows a writable one",
            })?;
            if w.is_empty() {
                return Err(QueueError::Layout {
                    head,
                    reason: "a block request has no status byte",
                });
            }
            let (status, written) = self.request(&a.mem, head, &r, &w)?;
            if status != S_OK {
                self.metrics.io_errors += 1;
            }
            let status_at = w.len() - 1;
            if !w.write(&a.mem, status_at, &[status]) {
                return Err(QueueError::Memory { head });
            }
            let used = u32::try_from(written + 1).unwrap_or(u32::MAX);
            queue::complete(q, &a.mem, head, used)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_queue(index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioInterrupt;
    use crate::devices::virtio::queue::tests::{F_NEXT, F_WRITE, mem, raw, setup};
    use std::io::Write;
    use vm_memory::Bytes;

    fn device(readonly: bool) -> (Block, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 8 * 512];
        data[512..1024].fill(0x5a);
        f.write_all(&data).unwrap();
        let disk = DiskBackend::open(f.path(), readonly).unwrap();
        (Block::new(disk), f)
    }

    fn header(m: &crate::vstate::memory::GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn run(
        dev: &mut Block,
        m: &crate::vstate::memory::GuestMemoryMmap,
        q: virtio_queue::Queue,
    ) -> Result<virtio_queue::Queue, QueueError> {
        dev.activate(Activation {
            mem: m.clone(),
            queues: vec![q],
            interrupt: VirtioInterrupt::polled(1),
            acked_features: VIRTIO_F_VERSION_1,
        });
        dev.process_queue(0)?;
        Ok(dev.active.take().unwrap().queues.remove(0))
    }

    #[test]
    fn read_write_flush_and_id() {
        let (mut dev, f) = device(false);
        let m = mem();
        // Read sector 1 into 0x9000, status at 0xa000.
        header(&m, 0x8000, T_IN, 1);
        let q = setup(
            &m,
            &[
                raw(0x8000, 16, F_NEXT, 1),
                raw(0x9000, 512, F_NEXT | F_WRITE, 2),
                raw(0xa000, 1, F_WRITE, 0),
            ],
            &[0],
        );
        run(&mut dev, &m, q).unwrap();
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert!(got.iter().all(|b| *b == 0x5a));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_OK);

        // Write 0x77 to sector 3, header and data in one descriptor.
        header(&m, 0xb000, T_OUT, 3);
        m.write_slice(&[0x77; 512], GuestAddress(0xb010)).unwrap();
        let q = setup(
            &m,
            &[raw(0xb000, 528, F_NEXT, 1), raw(0xa000, 1, F_WRITE, 0)],
            &[0],
        );
        run(&mut dev, &m, q).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[3 * 512..4 * 512].iter().all(|b| *b == 0x77));

        header(&m, 0x8000, T_FLUSH, 0);
        let q = setup(
            &m,
            &[raw(0x8000, 16, F_NEXT, 1), raw(0xa000, 1, F_WRITE, 0)],
            &[0],
        );
        run(&mut dev, &m, q).unwrap();
        assert_eq!(dev.metrics().flushes, 1);

        header(&m, 0x8000, T_GET_ID, 0);
        let q = setup(
            &m,
            &[
                raw(0x8000, 16, F_NEXT, 1),
                raw(0x9000, 20, F_NEXT | F_WRITE, 2),
                raw(0xa000, 1, F_WRITE, 0),
            ],
            &[0],
        );
        run(&mut dev, &m, q).unwrap();
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
        let name = f.path().file_name().unwrap().to_string_lossy();
        assert!(name.as_bytes().starts_with(&id[..name.len().min(20)]));
    }

    #[test]
    fn out_of_range_and_readonly_fail_with_ioerr() {
        let (mut dev, _f) = device(true);
        let m = mem();
        for (kind, sector) in [(T_IN, 8), (T_IN, u64::MAX / 256), (T_OUT, 0)] {
            header(&m, 0x8000, kind, sector);
            m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
            let flags = if kind == T_IN {
                F_NEXT | F_WRITE
            } else {
                F_NEXT
            };
            let q = setup(
                &m,
                &[
                    raw(0x8000, 16, F_NEXT, 1),
                    raw(0x9000, 512, flags, 2),
                    raw(0xa000, 1, F_WRITE, 0),
                ],
                &[0],
            );
            run(&mut dev, &m, q).unwrap();
            assert_eq!(m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), S_IOERR);
        }
        assert_eq!(dev.metrics().io_errors, 3);
    }

    #[test]
    fn malformed_requests_stop_the_queue() {
        let (mut dev, _f) = device(false);
        let m = mem();
        // No status byte.
        let q = setup(&m, &[raw(0x8000, 16, 0, 0)], &[0]);
        assert!(run(&mut dev, &m, q).is_err());
        // Short header.
        let q = setup(
            &m,
            &[raw(0x8000, 8, F_NEXT, 1), raw(0xa000, 1, F_WRITE, 0)],
            &[0],
        );
        assert!(run(&mut dev, &m, q).is_err());
        // Loop.
        let q = setup(
            &m,
            &[raw(0x8000, 16, F_NEXT, 1), raw(0x9000, 16, F_NEXT, 0)],
            &[0],
        );
        assert!(run(&mut dev, &m, q).is_err());
    }
}
