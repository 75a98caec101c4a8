//! Randomized hostile rings from proptest strategies, over the ring code
//! the fuzz targets share (`tests/fuzz_targets/ring.rs`; the byte-driven,
//! coverage-guided runs are `cargo xtask fuzz`): random descriptor
//! tables (addresses in and far outside guest memory, any length, flags and
//! `next`), random available rings and indices, and random request bytes,
//! fed to `queue::pop` and to the rng and block devices. The property: every
//! case terminates without a panic, and whatever the device accepted it
//! completed through the used ring with a length inside the buffers it was
//! given.

mod fuzz_targets;

use fuzz_targets::ring::{Case, DATA, MEM, RawDesc, block_case, drive, pop_all};
use neph_vmm::devices::virtio::rng::Rng;
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => DATA..DATA + 0x4000,
        1 => 0..MEM,
        1 => any::<u64>(),
        1 => Just(MEM - 8),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..600, 1 => any::<u32>(), 1 => Just(16u32), 1 => Just(1u32)]
}

fn desc() -> impl Strategy<Value = RawDesc> {
    (
        addr(),
        len(),
        0u16..8,
        prop_oneof![3 => 0u16..16, 1 => any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| RawDesc {
            addr,
            len,
            flags,
            next,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u32..5,
        prop::collection::vec(desc(), 16),
        prop::collection::vec(prop_oneof![3 => 0u16..16, 1 => any::<u16>()], 16),
        prop_oneof![3 => 0u16..20, 1 => any::<u16>()],
        prop::collection::vec(any::<u8>(), 0x4000),
    )
        .prop_map(|(size_log2, descs, ring, avail_idx, data)| Case {
            size_log2,
            descs,
            ring,
            avail_idx,
            data,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn pop_terminates_and_validates(c in case()) {
        pop_all(&c);
    }

    #[test]
    fn rng_survives_hostile_rings(c in case()) {
        drive(Box::<Rng>::default(), &c, 0);
    }

    #[test]
    fn block_survives_hostile_rings(c in case(), readonly in any::<bool>()) {
        block_case(&c, readonly);
    }
}
