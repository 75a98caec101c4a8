//! A request's buffers as two byte streams, device-readable and
//! device-writable, whatever way the driver split them into descriptors.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Buffers of one direction, in chain order.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    parts: Vec<(u64, u64)>,
    len: u64,
}

impl Segments {
    /// The readable and the writable buffers of `descs`; `None` if a
    /// readable buffer follows a writable one (the spec forbids it).
    pub fn split(descs: &[Descriptor]) -> Option<(Self, Self)> {
        let mut r = Self::default();
        let mut w = Self::default();
        for d in descs {
            if d.is_write_only() {
                w.push(d.addr().0, u64::from(d.len()));
            } else {
                if w.len > 0 {
                    return None;
                }
                r.push(d.addr().0, u64::from(d.len()));
            }
        }
        Some((r, w))
    }

    fn push(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.parts.push((addr, len));
            self.len += len;
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `(guest address, length)` pieces covering `[start, start + len)`.
    pub fn pieces(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let end = start.saturating_add(len).min(self.len);
        let mut pos = 0u64;
        for &(addr, plen) in &self.parts {
            let (s, e) = (pos, pos + plen);
            pos = e;
            if e <= start {
                continue;
            }
            if s >= end {
                break;
            }
            let from = start.max(s);
            let to = end.min(e);
            out.push((addr + (from - s), to - from));
        }
        out
    }

    /// Copies `buf.len()` bytes from offset `start` of the stream.
    pub fn read(&self, mem: &GuestMemoryMmap, start: u64, buf: &mut [u8]) -> bool {
        if start.saturating_add(buf.len() as u64) > self.len {
            return false;
        }
        let mut done = 0usize;
        for (addr, len) in self.pieces(start, buf.len() as u64) {
            let Ok(len) = usize::try_from(len) else {
                return false;
            };
            if mem
                .read_slice(&mut buf[done..done + len], GuestAddress(addr))
                .is_err()
            {
                return false;
            }
            done += len;
        }
        true
    }

    /// Copies `buf` to offset `start` of the stream.
    pub fn write(&self, mem: &GuestMemoryMmap, start: u64, buf: &[u8]) -> bool {
        if start.saturating_add(buf.len() as u64) > self.len {
            return false;
        }
        let mut done = 0usize;
        for (addr, len) in self.pieces(start, buf.len() as u64) {
            let Ok(len) = usize::try_from(len) else {
                return false;
            };
            if mem
                .write_slice(&buf[done..done + len], GuestAddress(addr))
                .is_err()
            {
                return false;
            }
            done += len;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_ranges_across_descriptors() {
        let d = [
            Descriptor::new(0x1000, 10, 0, 0),
            Descriptor::new(0x2000, 6, 0, 0),
            Descriptor::new(0x3000, 4, 2, 0),
        ];
        let (r, w) = Segments::split(&d).unwrap();
        assert_eq!((r.len(), w.len()), (16, 4));
        assert_eq!(r.pieces(8, 4), vec![(0x1008, 2), (0x2000, 2)]);
        assert_eq!(r.pieces(0, 100), vec![(0x1000, 10), (0x2000, 6)]);
        assert!(r.pieces(16, 1).is_empty());
        let bad = [
            Descriptor::new(0x3000, 4, 2, 0),
            Descriptor::new(0x1000, 1, 0, 0),
        ];
        assert!(Segments::split(&bad).is_none());
    }
}
