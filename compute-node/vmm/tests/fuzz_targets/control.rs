//! One line sent to the control socket (`neph_vmm::api::server::
//! parse_request`, what each client thread runs before the VM sees the
//! request). The properties: no panic; a line is refused (always one over
//! 64 KiB), or is a request that serializes and reads back unchanged (so
//! what the VM acts on is exactly what was parsed).

use neph_vmm::api::Request;
use neph_vmm::api::server::{MAX_LINE, ParseRequestError, parse_request};

/// Fuzz target `control_request`.
pub fn request_target(data: &[u8]) {
    match parse_request(data) {
        Ok(req) => {
            assert!(data.len() as u64 <= MAX_LINE);
            let json = serde_json::to_vec(&req).expect("a request serializes");
            let back: Request = serde_json::from_slice(&json).expect("a request reads back");
            assert_eq!(back, req);
        }
        Err(ParseRequestError::TooLong) => assert!(data.len() as u64 > MAX_LINE),
        Err(ParseRequestError::Invalid(e)) => drop(e.to_string()),
    }
}

/// Every command, well formed.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"pause"}"#,
        r#"{"cmd":"resume"}"#,
        r#"{"cmd":"lease","until_ms":123456}"#,
        r#"{"cmd":"shutdown","timeout_ms":5000}"#,
        r#"{"cmd":"stop"}"#,
        r#"{"cmd":"metrics"}"#,
        r#"{"cmd":"migrate","to":"10.0.0.2:7000","max_downtime_ms":50,"timeout_ms":1000,"verify":true,"streams":4,"protocol":2}"#,
        r#"{"cmd":"migrate_status"}"#,
        "{\"cmd\":\"migrate_cancel\"}\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
