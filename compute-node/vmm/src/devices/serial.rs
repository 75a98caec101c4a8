//! The 16550 UART at I/O 0x3f8 (IRQ 4), built on vm-superio, and the
//! process-wide [`Console`] it is wired to: output goes to stdout or a log
//! file and to every client of the console socket; input comes from stdin or
//! the console socket and is queued until the guest's receive FIFO has room.
//! The console outlives guest reboots; each boot attaches a new UART to it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::SerialState;

use super::interrupt::IrqLine;

/// First I/O port of the UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Its legacy IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// Input bytes kept while the guest is not reading.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// The process-wide console.
pub struct Console {
    sink: Mutex<Box<dyn Write + Send>>,
    clients: Mutex<Vec<UnixStream>>,
    target: Mutex<Weak<Mutex<SerialDevice>>>,
    bytes_out: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Self {
            sink: Mutex::new(sink),
            clients: Mutex::new(Vec::new()),
            target: Mutex::new(Weak::new()),
            bytes_out: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Adds a console-socket client that receives all further output.
    pub fn add_client(&self, stream: UnixStream) -> io::Result<()> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stream);
        Ok(())
    }

    /// Feeds `bytes` to the guest's UART (queued while its FIFO is full).
    pub fn input(&self, bytes: &[u8]) {
        let target = self
            .target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade();
        if let Some(dev) = target {
            dev.lock().unwrap_or_else(|e| e.into_inner()).enqueue(bytes);
        }
    }

    /// Bytes the guest has written so far (all boots).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn attach(&self, dev: &Arc<Mutex<SerialDevice>>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(dev);
    }

    fn output(&self, bytes: &[u8]) {
        self.bytes_out
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        {
            let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
            // A console that cannot be written must not stop the guest.
            let _ = sink.write_all(bytes).and_then(|()| sink.flush());
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        // A client that stops reading loses output rather than stalling the
        // vCPU; a client that went away is dropped.
        clients.retain(|c| match send_nonblocking(c, bytes) {
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        });
    }
}

/// Sends without blocking (and without SIGPIPE), leaving the socket's own
/// blocking mode alone for its reader.
fn send_nonblocking(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes and the fd is
    // an open socket owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What the UART writes through: the console.
#[derive(Debug)]
pub struct ConsoleWriter(Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Saved UART registers and receive FIFO, plus console input not yet
/// taken by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSavedState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO (at most 64 bytes).
    pub fifo: Vec<u8>,
    /// Input queued behind the FIFO (at most 64 KiB).
    pub pending: Vec<u8>,
}

/// Loading saved UART state failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreSerialError {
    /// More queued input than the UART keeps.
    #[error("saved console input of {0} bytes is larger than the 64 KiB queue")]
    Pending(usize),
    /// vm-superio refused the state (e.g. a FIFO over 64 bytes).
    #[error("the saved UART state is invalid: {0:?}")]
    Invalid(String),
    /// The interrupt line could not be shared.
    #[error("cannot reuse the UART's interrupt line")]
    Irq(#[source] io::Error),
}

/// The UART with its pending input.
pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>,
    pending: VecDeque<u8>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, attached to `console` as its input target.
    pub fn attach(console: &Arc<Console>, irq: IrqLine) -> Arc<Mutex<Self>> {
        let dev = Arc::new(Mutex::new(Self {
            uart: Serial::new(irq, ConsoleWriter(console.clone())),
            pending: VecDeque::new(),
        }));
        console.attach(&dev);
        dev
    }

    /// Saves the UART state.
    pub fn save_state(&self) -> SerialSavedState {
        let s = self.uart.state();
        SerialSavedState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            fifo: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Loads a state saved by [`Self::save_state`] (checked first).
    pub fn restore_state(&mut self, state: &SerialSavedState) -> Result<(), RestoreSerialError> {
        if state.pending.len() > MAX_PENDING_INPUT {
            return Err(RestoreSerialError::Pending(state.pending.len()));
        }
        let s = SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.fifo.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .try_clone()
            .map_err(RestoreSerialError::Irq)?;
        let writer = ConsoleWriter(self.uart.writer().0.clone());
        let uart = Serial::from_state(&s, irq, vm_superio::serial::NoEvents, writer)
            .map_err(|e| RestoreSerialError::Invalid(format!("{e:?}")))?;
        self.uart = uart;
        self.pending = state.pending.iter().copied().collect();
        Ok(())
    }

    /// Register read at `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.uart.read(offset);
        if offset == 0 {
            self.flush_input();
        }
        v
    }

    /// Register write at `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        // An interrupt that cannot be raised is not the guest's fault and
        // not fatal: the guest may poll.
        let _ = self.uart.write(offset, value);
    }

    fn enqueue(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.flush_input();
    }

    fn flush_input(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            match self.uart.enqueue_raw_bytes(front) {
                Ok(n) if n > 0 => {
                    self.pending.drain(..n);
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_clients_and_input_is_queued() {
        let out = Shared::default();
        let console = Console::new(Box::new(out.clone()));
        let (a, mut b) = UnixStream::pair().unwrap();
        console.add_client(a).unwrap();
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let dev = SerialDevice::attach(&console, IrqLine::Irqfd(evt));
        dev.lock().unwrap().write(0, b'h');
        dev.lock().unwrap().write(0, b'i');
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        let mut buf = [0u8; 2];
        io::Read::read_exact(&mut b, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert_eq!(console.bytes_out(), 2);

        // 100 bytes: 64 fit the FIFO, the rest wait for the guest to read.
        let input: Vec<u8> = (0..100u8).collect();
        console.input(&input);
        let mut got = Vec::new();
        let mut d = dev.lock().unwrap();
        while d.read(5) & 1 == 1 {
            got.push(d.read(0));
        }
        assert_eq!(got, input);
    }
}
