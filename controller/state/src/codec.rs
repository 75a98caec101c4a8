//! Versioned binary encodings of everything that leaves memory: envelopes in
//! the log, outcomes sent back to a forwarding member, and snapshots. Each
//! starts with one format byte; the body is `postcard` (compact, serde-based).
//! Decoding treats the bytes as untrusted: any error is reported, never a
//! panic.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{ApplyError, Command, Envelope, Response, State};

/// Format byte of outcomes and commands, and of envelopes before they had
/// an origin (still decoded: a log written by the previous release replays).
pub const FORMAT_V1: u8 = 1;
/// Format byte of the current envelope encoding (with its origin).
pub const FORMAT_V2: u8 = 2;
/// Leading bytes of a snapshot: magic and format version. Version 2 added
/// the audit trail, version 3 the node join tokens, version 4 the node
/// members (joined and removed nodes), version 5 the sealed cluster CA,
/// version 6 the instances' stop timeouts and the groups' `max_per_node`,
/// version 7 the uploaded images' files;
/// an older snapshot is refused with [`DecodeError::UnknownFormat`]
/// (pre-release: no conversion is kept).
pub const SNAPSHOT_MAGIC: &[u8; 4] = b"NSS\x07";

/// Why bytes could not be decoded.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// There were no bytes at all.
    #[error("the encoded data is empty")]
    Empty,
    /// The format byte names a version this build does not know.
    #[error("unknown encoding format {0}")]
    UnknownFormat(u8),
    /// The body is not a valid encoding.
    #[error("malformed encoded data")]
    Malformed(#[from] postcard::Error),
}

/// The result of applying one command, as sent between members.
pub type Outcome = Result<Response, ApplyError>;

fn encode<T: Serialize>(prefix: &[u8], value: &T) -> Vec<u8> {
    // Serializing plain data structs into a Vec cannot fail; an error here
    // would be a bug in the data model (e.g. a map with non-string keys that
    // postcard rejects), so fall back to the prefix alone, which will fail to
    // decode loudly instead of panicking the process.
    match postcard::to_extend(value, prefix.to_vec()) {
        Ok(v) => v,
        Err(_) => prefix.to_vec(),
    }
}

fn decode<'a, T: Deserialize<'a>>(prefix: &[u8], bytes: &'a [u8]) -> Result<T, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let Some(body) = bytes.strip_prefix(prefix) else {
        return Err(DecodeError::UnknownFormat(bytes[0]));
    };
    Ok(postcard::from_bytes(body)?)
}

/// Encodes an envelope for the log.
pub fn encode_envelope(env: &Envelope) -> Vec<u8> {
    encode(&[FORMAT_V2], env)
}

/// An envelope as format 1 wrote it: no origin.
#[derive(Deserialize)]
struct EnvelopeV1 {
    time: crate::model::UnixMs,
    actor: String,
    request_id: Option<String>,
    fence_term: Option<u64>,
    command: Command,
}

/// Decodes an envelope from the log (the current format or the previous).
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.first() == Some(&FORMAT_V1) {
        let v1: EnvelopeV1 = decode(&[FORMAT_V1], bytes)?;
        return Ok(Envelope {
            time: v1.time,
            actor: v1.actor,
            request_id: v1.request_id,
            fence_term: v1.fence_term,
            command: v1.command,
            origin: None,
        });
    }
    decode(&[FORMAT_V2], bytes)
}

/// Encodes a command alone (used as the fingerprint of idempotent requests).
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    encode(&[FORMAT_V1], cmd)
}

/// Encodes an outcome.
pub fn encode_outcome(outcome: &Outcome) -> Vec<u8> {
    encode(&[FORMAT_V1], outcome)
}

/// Decodes an outcome.
pub fn decode_outcome(bytes: &[u8]) -> Result<Outcome, DecodeError> {
    decode(&[FORMAT_V1], bytes)
}

/// Encodes the whole state as a snapshot.
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    encode(SNAPSHOT_MAGIC, state)
}

/// Decodes a snapshot.
pub fn decode_snapshot(bytes: &[u8]) -> Result<State, DecodeError> {
    if bytes.len() < SNAPSHOT_MAGIC.len() {
        return Err(DecodeError::Empty);
    }
    if !bytes.starts_with(SNAPSHOT_MAGIC) {
        return Err(DecodeError::UnknownFormat(bytes[3]));
    }
    let mut state: State = decode(SNAPSHOT_MAGIC, bytes)?;
    state.rebuild_indexes();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let env = Envelope::new(
            7,
            "system",
            Command::KvPut {
                key: "k".into(),
                value: vec![1, 2, 3],
            },
        );
        let bytes = encode_envelope(&env);
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(decode_envelope(&bytes).unwrap(), env);
        let with_origin = Envelope {
            origin: Some(crate::Origin {
                peer: "127.0.0.1:4000".into(),
                rpc: "/nephele.iam.v1.Iam/CreateProject".into(),
            }),
            ..env.clone()
        };
        let bytes = encode_envelope(&with_origin);
        assert_eq!(decode_envelope(&bytes).unwrap(), with_origin);
    }

    #[test]
    fn a_format_1_envelope_still_decodes_without_an_origin() {
        // The previous release's encoding: the same fields, no origin.
        #[derive(Serialize)]
        struct Old<'a> {
            time: u64,
            actor: &'a str,
            request_id: Option<String>,
            fence_term: Option<u64>,
            command: Command,
        }
        let old = Old {
            time: 9,
            actor: "users/alice",
            request_id: Some("r1".into()),
            fence_term: Some(3),
            command: Command::Noop,
        };
        let bytes = encode(&[FORMAT_V1], &old);
        let env = decode_envelope(&bytes).unwrap();
        assert_eq!(
            env,
            Envelope {
                time: 9,
                actor: "users/alice".into(),
                request_id: Some("r1".into()),
                fence_term: Some(3),
                command: Command::Noop,
                origin: None,
            }
        );
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(decode_envelope(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_envelope(&[9, 0, 0]),
            Err(DecodeError::UnknownFormat(9))
        ));
        for format in [FORMAT_V1, FORMAT_V2] {
            assert!(matches!(
                decode_envelope(&[format, 0xff, 0xff, 0xff]),
                Err(DecodeError::Malformed(_))
            ));
        }
        assert!(matches!(
            decode_snapshot(b"NSS\x01rest"),
            Err(DecodeError::UnknownFormat(1))
        ));
        assert!(decode_snapshot(b"NSS").is_err());
        assert!(decode_snapshot(b"XXXX").is_err());
        let mut snap = encode_snapshot(&State::default());
        snap.truncate(snap.len() - 1);
        assert!(decode_snapshot(&snap).is_err());
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = State::default();
        crate::apply(
            &mut s,
            &Envelope::new(
                1,
                "system",
                Command::CreateProject {
                    project_id: "p1".into(),
                    display_name: "P".into(),
                    quota: None,
                },
            ),
            1,
        )
        .unwrap();
        assert_eq!(decode_snapshot(&encode_snapshot(&s)).unwrap(), s);
    }
}
