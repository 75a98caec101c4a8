//! Resource names: `names::parse` against every pattern, `validate_id`,
//! `project_of`. The properties: no panic; an accepted id is 1 to 63
//! characters of `a-z0-9-`, starting with a letter and not ending with
//! `-`; an accepted name has one valid id per `{}` segment and is exactly
//! the pattern with those ids put in.

use nephele_state::names::{self, MAX_ID_LEN, parse, project_of, validate_id};

/// Every pattern the state machine parses names with.
pub const PATTERNS: &[&str] = &[
    names::PROJECT,
    names::INSTANCE,
    names::SERVER_GROUP,
    names::USER,
    names::TOKEN,
    names::FLAVOR,
    names::IMAGE,
    names::NODE,
    names::MIGRATION,
    names::OPERATION,
];

fn check_id(id: &str) {
    let b = id.as_bytes();
    assert!(!b.is_empty() && b.len() <= MAX_ID_LEN, "{id:?} accepted");
    assert!(b[0].is_ascii_lowercase(), "{id:?} accepted");
    assert!(b[b.len() - 1] != b'-', "{id:?} accepted");
    assert!(
        b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-'),
        "{id:?} accepted"
    );
}

/// Fuzz target `resource_name`: the first byte picks the pattern, the rest
/// is the name (invalid UTF-8 replaced, as a gRPC string cannot hold it).
pub fn name_target(data: &[u8]) {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let pattern = PATTERNS[usize::from(*sel) % PATTERNS.len()];
    let name = String::from_utf8_lossy(rest);
    if validate_id(&name).is_ok() {
        check_id(&name);
    }
    if let Ok(ids) = parse(&name, pattern) {
        let mut rebuilt = Vec::new();
        let mut it = ids.iter();
        for seg in pattern.split('/') {
            if seg.starts_with('{') {
                let id = it.next().expect("one id per placeholder");
                check_id(id);
                rebuilt.push(*id);
            } else {
                rebuilt.push(seg);
            }
        }
        assert!(it.next().is_none(), "more ids than placeholders");
        assert_eq!(rebuilt.join("/"), name);
    }
    if let Some(p) = project_of(&name) {
        assert!(name.starts_with(p) && p.starts_with("projects/"));
    }
}

/// A valid name for each pattern, and a few near misses.
pub fn seeds() -> Vec<Vec<u8>> {
    let names = [
        "projects/p1",
        "projects/p1/instances/web-1",
        "projects/p1/serverGroups/g",
        "users/alice",
        "users/alice/tokens/t1",
        "flavors/small",
        "images/debian-12",
        "nodes/n1",
        "migrations/m1",
        "operations/op-1",
    ];
    let mut out: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut v = vec![u8::try_from(i).unwrap_or(0)];
            v.extend_from_slice(n.as_bytes());
            v
        })
        .collect();
    out.push(b"\x01projects/p1/instances/web-".to_vec());
    out.push(b"\x01projects//instances/a".to_vec());
    out.push(format!("\x07nodes/{}", "a".repeat(64)).into_bytes());
    out
}
