//! `neph instance console NAME`: the instance's serial console, both ways,
//! through the controller (`Instances.Console`).
//!
//! On a terminal, stdin is put in raw mode (every key goes to the guest,
//! restored on exit, also on error) and `Ctrl-]` detaches. From a pipe,
//! input is sent as it comes; at its end neph keeps printing until the
//! output has been quiet for the settle time, then exits.
//!
//! Stdin is read on a plain thread: a blocking read cannot be cancelled, and
//! on a thread of its own it never holds up the runtime's shutdown.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::time::Duration;

use nephele_proto::compute::v1 as compute;
use rustix::termios::{self, OptionalActions, Termios};
use tokio::sync::mpsc;

use crate::client::{CliError, Conn};

/// `Ctrl-]`, the detach key.
pub const DETACH: u8 = 0x1d;

/// The terminal in raw mode; dropping it restores the saved mode.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode, CliError> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin)
            .map_err(|e| CliError::Usage(format!("cannot read the terminal mode: {e}")))?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)
            .map_err(|e| CliError::Usage(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// What the stdin thread reports.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    /// Bytes to type.
    Bytes(Vec<u8>),
    /// The person pressed the detach key.
    Detach,
    /// Stdin ended (or failed).
    End,
}

/// Splits `chunk` at the detach key when `watch_detach`: what to send
/// before it, and whether it was there.
fn split_detach(chunk: &[u8], watch_detach: bool) -> (&[u8], bool) {
    match chunk.iter().position(|b| watch_detach && *b == DETACH) {
        Some(at) => (&chunk[..at], true),
        None => (chunk, false),
    }
}

fn read_stdin(tx: mpsc::Sender<Input>, terminal: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.blocking_send(Input::End);
                return;
            }
            Ok(n) => n,
        };
        let (bytes, detach) = split_detach(&buf[..n], terminal);
        if !bytes.is_empty() && tx.blocking_send(Input::Bytes(bytes.to_vec())).is_err() {
            return;
        }
        if detach {
            let _ = tx.blocking_send(Input::Detach);
            return;
        }
    }
}

/// Attaches to `name`'s console until detached, the input ends and the
/// output settles, or the controller ends the stream.
pub async fn attach(conn: &Conn, name: String, settle: Duration) -> Result<(), CliError> {
    let terminal = std::io::stdin().is_terminal();
    let (requests, rx) = mpsc::channel::<compute::ConsoleRequest>(64);
    let first = compute::ConsoleRequest {
        name: name.clone(),
        input: Vec::new(),
    };
    // Cannot fail: the receiver is alive and the buffer empty.
    let _ = requests.try_send(first);
    let mut output = conn
        .instances()
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    if terminal {
        eprint!("Connected to {name}. Escape character is '^]' (Ctrl-]): press it to detach.\r\n");
    }
    let raw = if terminal {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let (input_tx, mut input) = mpsc::channel(16);
    std::thread::spawn(move || read_stdin(input_tx, terminal));

    let mut stdout = std::io::stdout();
    let mut input_open = true;
    // Once input ended (pipe): when to stop if nothing more is printed.
    let mut quiet_until: Option<tokio::time::Instant> = None;
    let ended = loop {
        let settle_timer = async {
            match quiet_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = output.message() => match got {
                Ok(Some(m)) => {
                    let _ = stdout.write_all(&m.output);
                    let _ = stdout.flush();
                    if quiet_until.is_some() {
                        quiet_until = Some(tokio::time::Instant::now() + settle);
                    }
                }
                Ok(None) => break Ok("the console was closed"),
                Err(s) => break Err(CliError::from(s)),
            },
            got = input.recv(), if input_open => match got {
                Some(Input::Bytes(b)) => {
                    let typed = compute::ConsoleRequest { name: String::new(), input: b };
                    if requests.send(typed).await.is_err() {
                        break Ok("the console was closed");
                    }
                }
                Some(Input::Detach) => break Ok("detached"),
                Some(Input::End) | None => {
                    input_open = false;
                    if terminal {
                        break Ok("detached: end of input");
                    }
                    quiet_until = Some(tokio::time::Instant::now() + settle);
                }
            },
            () = settle_timer => break Ok("end of input"),
        }
    };
    drop(raw);
    if terminal {
        match &ended {
            Ok(why) => eprintln!("\n{why} ({name})"),
            Err(_) => eprintln!(),
        }
    }
    ended.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detach_key_splits_input_on_a_terminal_only() {
        assert_eq!(split_detach(b"ls\r", true), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1dcd", true), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1d", true), (&b""[..], true));
        assert_eq!(split_detach(b"ab\x1dcd", false), (&b"ab\x1dcd"[..], false));
    }
}
