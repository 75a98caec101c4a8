//! The hypervisor's fuzz targets: each a function over arbitrary bytes that
//! must never panic, hang or allocate without bound, whatever the bytes.
//! Shared by the crate tests (`tests/fuzz.rs` runs each briefly on seeds,
//! saved regressions and random inputs; `tests/fuzz_queue.rs` drives the ring
//! target from proptest strategies) and by the coverage-guided AFL++ harness
//! in the workspace's `fuzz/` crate (`cargo xtask fuzz`), which includes
//! this directory by path.
//!
//! | target | what the bytes are |
//! |---|---|
//! | `virtio_queue` | a ring (descriptor table, available ring, buffers) walked by `queue::pop` |
//! | `virtio_rng`, `virtio_block`, `virtio_net` | a ring a driver handed to that device (requests included) |
//! | `migration_stream` | what a migration source sends a target, from the header on |
//! | `control_request` | one line sent to the control socket |

#![allow(dead_code)]

pub mod control;
pub mod migration;
pub mod ring;

/// A fuzz target.
pub type Target = fn(&[u8]);

/// Every target by name, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_queue", ring::queue_target),
    ("virtio_rng", ring::rng_target),
    ("virtio_block", ring::block_target),
    ("virtio_net", ring::net_target),
    ("migration_stream", migration::stream_target),
    ("control_request", control::request_target),
];

/// Valid or nearly valid inputs to start each target from.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "virtio_queue" | "virtio_rng" => ring::seeds(ring::Device::Rng),
        "virtio_block" => ring::seeds(ring::Device::Block),
        "virtio_net" => ring::seeds(ring::Device::Net),
        "migration_stream" => migration::seeds(),
        "control_request" => control::seeds(),
        _ => Vec::new(),
    }
}

/// Reads fixed-width little-endian values off the front of fuzz input;
/// once the bytes run out every value reads as zero, so any input decodes.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Input over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.data.len());
        b[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        b
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// The next two bytes.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    /// The next four bytes.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// The next eight bytes.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Writes what [`Input`] reads, for building seeds.
#[derive(Debug, Default)]
pub struct Seed(pub Vec<u8>);

impl Seed {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Appends two bytes.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends four bytes.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends eight bytes.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}
