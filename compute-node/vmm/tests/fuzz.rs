//! The hypervisor's fuzz targets (`tests/fuzz_targets/`) run briefly as part
//! of the suite: each on its seeds, on every saved regression input in
//! `tests/fuzz-regressions/<target>/` (inputs that once crashed it, found
//! by `cargo xtask fuzz`), and on a few hundred random inputs, raw or
//! mutated from the seeds. The long, coverage-guided runs are `cargo xtask
//! fuzz` (AFL++, see the workspace's `fuzz/` crate).

mod fuzz_targets;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::path::PathBuf;
use std::process::Command;

use fuzz_targets::ring::{Case, net_case};
use fuzz_targets::{TARGETS, Target, seeds};
use neph_vmm::devices::virtio::net::Tap;
use proptest::prelude::*;
use proptest::sample::Index;

fn target(name: &str) -> Target {
    replay::target(TARGETS, name)
}

fn regressions(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    replay::regressions(env!("CARGO_MANIFEST_DIR"), name)
}

/// Random bytes, or a seed with a few bytes overwritten and maybe cut.
fn inputs(name: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(name);
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..4096),
        3 => (
            prop::sample::select(seeds),
            prop::collection::vec((any::<Index>(), any::<u8>()), 0..8),
            prop::option::of(any::<Index>()),
        )
            .prop_map(|(mut s, edits, cut)| {
                if !s.is_empty() {
                    for (at, b) in edits {
                        let i = at.index(s.len());
                        s[i] = b;
                    }
                    if let Some(cut) = cut {
                        s.truncate(cut.index(s.len()));
                    }
                }
                s
            }),
    ]
}

/// A tap for the net target, removed when dropped.
struct TempTap {
    name: String,
    tap: Tap,
}

impl TempTap {
    fn create() -> Option<Self> {
        let name = format!("nfz{}", std::process::id());
        let made = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !made {
            return None;
        }
        match Tap::open(&name) {
            Ok(tap) => Some(Self { name, tap }),
            Err(_) => {
                let _ = Command::new("ip").args(["link", "del", &name]).status();
                None
            }
        }
    }
}

impl Drop for TempTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

#[test]
fn every_target_has_seeds_and_passes_them_and_its_regressions() {
    for (name, f) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        if *name == "virtio_net" {
            continue; // Needs a tap: below.
        }
        for s in &seeds {
            f(s);
        }
        for (path, input) in regressions(name) {
            eprintln!("{name}: {}", path.display());
            f(&input);
        }
    }
}

#[test]
fn seeds_decode_to_what_they_encode() {
    for name in ["virtio_queue", "virtio_net"] {
        for s in seeds(name) {
            assert_eq!(Case::decode(&Case::decode(&s).encode()), Case::decode(&s));
        }
    }
    // The complete migration streams are taken; the one with a disk stops
    // early and is refused.
    let streams = seeds("migration_stream");
    assert!(fuzz_targets::migration::receive(&streams[0]).is_ok());
    assert!(fuzz_targets::migration::receive(&streams[1]).is_ok());
    assert!(fuzz_targets::migration::receive(&streams[2]).is_err());
    for s in seeds("control_request") {
        assert!(neph_vmm::api::server::parse_request(&s).is_ok());
    }
}

#[test]
fn hostile_migration_streams_are_refused() {
    use fuzz_targets::migration::{receive, valid_stream};
    use neph_vmm::migration::protocol::{self, Kind, ProtocolError};

    let good = valid_stream(protocol::VERSION, false);
    assert_eq!(receive(&good).unwrap(), good.len());
    // Truncated anywhere.
    for cut in 0..good.len() {
        assert!(receive(&good[..cut]).is_err(), "taken when cut at {cut}");
    }
    // Wrong version.
    let mut v = good.clone();
    v[8..12].copy_from_slice(&(protocol::VERSION + 1).to_le_bytes());
    assert!(matches!(receive(&v), Err(ProtocolError::Version(_))));
    // Garbage.
    assert!(matches!(
        receive(b"GET / HTTP/1.1\r\n\r\n"),
        Err(ProtocolError::Magic)
    ));
    // Oversized: a frame header claiming 4 GiB allocates nothing.
    let mut big = good[..12].to_vec();
    big.extend_from_slice(&[Kind::Config as u8, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(receive(&big), Err(ProtocolError::TooLarge(_))));
    // Wrong order: memory before the configuration, and `Complete` before
    // the machine state.
    let mut early = good[..12].to_vec();
    protocol::write_frame(&mut early, Kind::ZeroPages, &0u64.to_le_bytes()).unwrap();
    assert!(matches!(
        receive(&early),
        Err(ProtocolError::Unexpected { .. })
    ));
    let mut no_state = Vec::new();
    protocol::write_header(&mut no_state, protocol::VERSION).unwrap();
    let config_frame_len = 5 + u32::from_le_bytes(good[13..17].try_into().unwrap()) as usize;
    no_state.extend_from_slice(&good[12..12 + config_frame_len]);
    let complete = protocol::Complete {
        memory_checksum: None,
        pages_sent: 0,
    };
    protocol::write_value(&mut no_state, Kind::Complete, &complete).unwrap();
    protocol::write_frame(&mut no_state, Kind::Commit, b"").unwrap();
    assert!(matches!(
        receive(&no_state),
        Err(ProtocolError::Malformed { .. })
    ));
}

#[test]
fn net_target_on_a_tap() {
    let Some(tap) = TempTap::create() else {
        eprintln!("SKIP net_target_on_a_tap: cannot create a tap here (needs root and ip)");
        return;
    };
    for s in seeds("virtio_net")
        .into_iter()
        .chain(regressions("virtio_net").into_iter().map(|(_, b)| b))
    {
        net_case(&Case::decode(&s), &tap.tap);
    }
    let config = ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    runner
        .run(&inputs("virtio_net"), |data| {
            net_case(&Case::decode(&data), &tap.tap);
            Ok(())
        })
        .expect("the net target survives random rings");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn virtio_queue(data in inputs("virtio_queue")) {
        target("virtio_queue")(&data);
    }

    #[test]
    fn virtio_rng(data in inputs("virtio_rng")) {
        target("virtio_rng")(&data);
    }

    #[test]
    fn virtio_block(data in inputs("virtio_block")) {
        target("virtio_block")(&data);
    }

    #[test]
    fn migration_stream(data in inputs("migration_stream")) {
        target("migration_stream")(&data);
    }

    #[test]
    fn control_request(data in inputs("control_request")) {
        target("control_request")(&data);
    }
}
