//! Serving the console socket: every client is added to the console's
//! output fan-out, and what it writes is fed to the guest's UART.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::devices::serial::Console;

/// Binding the console socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeConsoleError {
    /// Bind.
    #[error("cannot listen on {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// Thread.
    #[error("cannot start the console socket thread")]
    Thread(#[source] std::io::Error),
}

/// Serves `console` on a unix socket at `path`.
pub fn serve(path: &Path, console: Arc<Console>) -> Result<(), ServeConsoleError> {
    let listener =
        super::server::bind(path).map_err(|e| ServeConsoleError::Bind(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("console".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            // Its readers' threads inherit this filter.
            crate::sandbox::seccomp::install_or_exit(crate::sandbox::seccomp::ThreadKind::Console);
            for stream in listener.incoming().flatten() {
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                if console.add_client(stream).is_err() {
                    continue;
                }
                let c = console.clone();
                let _ = std::thread::Builder::new()
                    .name("console-client".into())
                    .stack_size(128 * 1024)
                    .spawn(move || feed(reader, &c));
            }
        })
        .map_err(ServeConsoleError::Thread)?;
    Ok(())
}

/// Copies bytes from `src` to the guest until EOF (used for stdin too).
pub fn feed(mut src: impl Read, console: &Console) {
    let mut buf = [0u8; 1024];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => console.input(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
}
