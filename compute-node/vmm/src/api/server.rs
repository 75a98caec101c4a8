//! Serving the control protocol: an accept thread and a thread per client,
//! each request forwarded to the VM's run loop through a [`VmHandle`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::{Request, Response};
use crate::vm::VmHandle;

/// Longest request line.
pub const MAX_LINE: u64 = 64 * 1024;

/// Binding the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeApiError {
    /// Bind.
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// Thread.
    #[error("cannot start the control socket thread")]
    Thread(#[source] std::io::Error),
}

/// Binds `path` (replacing a stale socket file) and serves it from a thread.
pub fn serve(path: &Path, handle: VmHandle) -> Result<(), ServeApiError> {
    let listener = bind(path).map_err(|e| ServeApiError::Bind(path.to_owned(), e))?;
    serve_listener(listener, handle)
}

/// Serves an already bound control socket from a thread (bound before the
/// privilege drop, served once the VM exists).
pub fn serve_listener(listener: UnixListener, handle: VmHandle) -> Result<(), ServeApiError> {
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            // Its clients' threads inherit this filter.
            crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Api);
            for stream in listener.incoming().flatten() {
                let h = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("api-client".into())
                    .stack_size(256 * 1024)
                    .spawn(move || client(stream, &h));
            }
        })
        .map_err(ServeApiError::Thread)?;
    Ok(())
}

/// Binds a unix socket at `path`, removing a leftover socket file first.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

fn client(stream: UnixStream, handle: &VmHandle) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let response = match parse_request(&line) {
            Ok(req) => handle.request(req),
            Err(e @ ParseRequestError::TooLong) => {
                let _ = write_line(&mut out, &Response::error("BAD_REQUEST", e.to_string()));
                return;
            }
            Err(e) => Response::error("BAD_REQUEST", e.to_string()),
        };
        if write_line(&mut out, &response).is_err() {
            return;
        }
    }
}

/// A request line that was refused (answered `BAD_REQUEST`).
#[derive(Debug, thiserror::Error)]
pub enum ParseRequestError {
    /// Over [`MAX_LINE`] bytes (the connection is closed after the answer).
    #[error("request line longer than 64 KiB")]
    TooLong,
    /// Not JSON, or not a known request.
    #[error("not a valid request: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// Decodes one request line as read from a client (the newline included or
/// not).
pub fn parse_request(line: &[u8]) -> Result<Request, ParseRequestError> {
    if line.len() as u64 > MAX_LINE {
        return Err(ParseRequestError::TooLong);
    }
    Ok(serde_json::from_slice::<Request>(line)?)
}

fn write_line(out: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    s.push(b'\n');
    out.write_all(&s)
}
