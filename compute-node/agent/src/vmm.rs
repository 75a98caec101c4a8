//! A client of one `neph-vmm` control socket (JSON lines; the protocol is
//! documented in `compute-node/vmm/src/api/mod.rs`). One connection per
//! call, every call bounded by a timeout, answers bounded in size: the VMM
//! is a separate process that may hang or die at any moment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// How long one control call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer line read.
const MAX_ANSWER: u64 = 1 << 20;

/// A control call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmCallError {
    /// No connection (the VMM is gone or not up yet).
    #[error("cannot reach the VMM control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The connection broke.
    #[error("the VMM control socket {0} broke")]
    Io(PathBuf, #[source] std::io::Error),
    /// No answer in time.
    #[error("the VMM at {0} did not answer within {CALL_TIMEOUT:?}")]
    Timeout(PathBuf),
    /// An answer that is not the protocol.
    #[error("the VMM at {0} gave an answer that is not valid: {1}")]
    BadAnswer(PathBuf, String),
    /// The VMM refused the request.
    #[error("the VMM refused {cmd}: {code}: {message}")]
    Refused {
        /// The command.
        cmd: String,
        /// Its stable error code.
        code: String,
        /// Its message.
        message: String,
    },
}

/// The `status` answer (the fields the agent uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmmStatus {
    /// `running`, `paused` or `shutting_down`.
    pub state: String,
    /// Boots in this process.
    pub boots: u64,
    /// The VMM's pid.
    pub pid: u32,
    /// Paused because its lease ran out.
    #[serde(default)]
    pub fenced: bool,
}

/// The `migrate_status` answer (the fields the agent uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct VmmMigration {
    /// `setup`, `precopy`, `stop_and_copy`, `in_doubt`, `completed`,
    /// `failed` or `cancelled`.
    pub state: String,
    /// `HOST:PORT` of the target.
    #[serde(default)]
    pub to: String,
    /// The gate said yes: no cancel any more.
    #[serde(default)]
    pub decided: bool,
    /// Round: 0 is the full pass.
    #[serde(default)]
    pub round: u32,
    /// Bytes sent so far.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes still to send.
    #[serde(default)]
    pub bytes_remaining: u64,
    /// Guest dirty rate, bytes per second.
    #[serde(default)]
    pub dirty_rate_bps: u64,
    /// Link throughput, bytes per second.
    #[serde(default)]
    pub throughput_bps: u64,
    /// Predicted downtime, ms.
    #[serde(default)]
    pub expected_downtime_ms: u64,
    /// Auto-converge throttle, percent.
    #[serde(default)]
    pub throttle_percent: u32,
    /// Measured downtime, once known, microseconds.
    #[serde(default)]
    pub downtime_us: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl VmmMigration {
    /// Completed, failed or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
    }

    /// The commit went out and no acknowledgement came back: the VM waits
    /// paused for [`VmmClient::migrate_resolve`].
    pub fn in_doubt(&self) -> bool {
        self.state == "in_doubt"
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    status: Option<VmmStatus>,
    #[serde(default)]
    migration: Option<VmmMigration>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// A `neph-vmm` control socket.
#[derive(Debug, Clone)]
pub struct VmmClient {
    path: PathBuf,
}

impl VmmClient {
    /// The control socket at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    async fn call(&self, request: String, cmd: &str) -> Result<Answer, VmmCallError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_inner(request, cmd)).await {
            Ok(r) => r,
            Err(_) => Err(VmmCallError::Timeout(self.path.clone())),
        }
    }

    async fn call_inner(&self, mut request: String, cmd: &str) -> Result<Answer, VmmCallError> {
        let io = |e| VmmCallError::Io(self.path.clone(), e);
        let mut s = UnixStream::connect(&self.path)
            .await
            .map_err(|e| VmmCallError::Connect(self.path.clone(), e))?;
        request.push('\n');
        s.write_all(request.as_bytes()).await.map_err(io)?;
        let mut line = Vec::new();
        BufReader::new(s)
            .take(MAX_ANSWER)
            .read_until(b'\n', &mut line)
            .await
            .map_err(io)?;
        let answer: Answer = serde_json::from_slice(&line)
            .map_err(|e| VmmCallError::BadAnswer(self.path.clone(), e.to_string()))?;
        if !answer.ok {
            let e = answer.error.unwrap_or(ErrorBody {
                code: "UNKNOWN".into(),
                message: "no error given".into(),
            });
            return Err(VmmCallError::Refused {
                cmd: cmd.to_owned(),
                code: e.code,
                message: e.message,
            });
        }
        Ok(answer)
    }

    /// `status`.
    pub async fn status(&self) -> Result<VmmStatus, VmmCallError> {
        let a = self.call(r#"{"cmd":"status"}"#.into(), "status").await?;
        a.status
            .ok_or_else(|| VmmCallError::BadAnswer(self.path.clone(), "no status".into()))
    }

    /// `lease`: the VM may run until `until_ms` on `CLOCK_MONOTONIC`.
    pub async fn lease(&self, until_ms: u64) -> Result<(), VmmCallError> {
        self.call(
            format!(r#"{{"cmd":"lease","until_ms":{until_ms}}}"#),
            "lease",
        )
        .await
        .map(drop)
    }

    /// `resume`.
    pub async fn resume(&self) -> Result<(), VmmCallError> {
        self.call(r#"{"cmd":"resume"}"#.into(), "resume")
            .await
            .map(drop)
    }

    /// `shutdown` with a grace period.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), VmmCallError> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.call(
            format!(r#"{{"cmd":"shutdown","timeout_ms":{ms}}}"#),
            "shutdown",
        )
        .await
        .map(drop)
    }

    /// `migrate` to the `neph-vmm --incoming` at `to`, the switchover
    /// decided by the gate served at `gate`.
    pub async fn migrate(
        &self,
        to: &str,
        max_downtime_ms: u64,
        gate: &Path,
    ) -> Result<(), VmmCallError> {
        let mut req = serde_json::json!({
            "cmd": "migrate",
            "to": to,
            "gate": gate,
        });
        if max_downtime_ms > 0 {
            req["max_downtime_ms"] = max_downtime_ms.into();
        }
        self.call(req.to_string(), "migrate").await.map(drop)
    }

    /// `migrate_status`.
    pub async fn migrate_status(&self) -> Result<VmmMigration, VmmCallError> {
        let a = self
            .call(r#"{"cmd":"migrate_status"}"#.into(), "migrate_status")
            .await?;
        a.migration
            .ok_or_else(|| VmmCallError::BadAnswer(self.path.clone(), "no migration".into()))
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<(), VmmCallError> {
        self.call(r#"{"cmd":"migrate_cancel"}"#.into(), "migrate_cancel")
            .await
            .map(drop)
    }

    /// `migrate_resolve`: settles an in-doubt migration (`moved`: the
    /// target runs the VM).
    pub async fn migrate_resolve(&self, moved: bool) -> Result<(), VmmCallError> {
        self.call(
            format!(r#"{{"cmd":"migrate_resolve","moved":{moved}}}"#),
            "migrate_resolve",
        )
        .await
        .map(drop)
    }

    /// `stop`.
    pub async fn stop(&self) -> Result<(), VmmCallError> {
        self.call(r#"{"cmd":"stop"}"#.into(), "stop")
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake VMM answering each connection's first line with `answer`.
    fn fake(path: &Path, answer: &'static str) {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    let _ = r.read_line(&mut line).await;
                    let mut s = r.into_inner();
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
    }

    #[tokio::test]
    async fn answers_errors_and_garbage() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("ok.sock");
        fake(
            &ok,
            "{\"ok\":true,\"status\":{\"state\":\"paused\",\"boots\":2,\"uptime_ms\":1,\"vcpus\":1,\"memory_mib\":128,\"pid\":9,\"fenced\":true}}\n",
        );
        let s = VmmClient::new(&ok).status().await.unwrap();
        assert_eq!(
            (s.state.as_str(), s.boots, s.pid, s.fenced),
            ("paused", 2, 9, true)
        );

        let refused = d.path().join("no.sock");
        fake(
            &refused,
            "{\"ok\":false,\"error\":{\"code\":\"INVALID_STATE\",\"message\":\"fenced\"}}\n",
        );
        match VmmClient::new(&refused).resume().await {
            Err(VmmCallError::Refused { code, .. }) => assert_eq!(code, "INVALID_STATE"),
            other => panic!("{other:?}"),
        }
        let bad = d.path().join("bad.sock");
        fake(&bad, "HTTP/1.1 400 nonsense\n");
        assert!(matches!(
            VmmClient::new(&bad).stop().await,
            Err(VmmCallError::BadAnswer(..))
        ));
        assert!(matches!(
            VmmClient::new(&d.path().join("none.sock")).status().await,
            Err(VmmCallError::Connect(..))
        ));
    }
}
