//! The 16550 UART at I/O port 0x3f8, polled: console output (with `\r\n`
//! line endings) and input for the shell, and the `print!`/`println!`
//! macros.
//!
//! Output is formatted into a small buffer, then sent one `out` per byte
//! (one VM exit each). A `rep outsb` would batch a whole buffer into one
//! exit, but VMMs built on kvm-ioctls see such an exit as a single wide
//! access to consecutive registers (its `IoOut` data does not say whether
//! the bytes are `count` writes to one port), so it is not used. The
//! transmitter is not polled: virtual UARTs take bytes as fast as they
//! come, and each poll would be another exit.

use core::fmt;
use core::mem::MaybeUninit;

use super::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const BUF: usize = 128;

/// Programs 115200 8N1, FIFOs on (so typed input queues up while the guest
/// sleeps between timer ticks), interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

/// Sends one byte (shell echo).
pub fn write_byte(b: u8) {
    outb(COM1, b);
}

/// Receives one byte, if one is waiting.
pub fn try_read() -> Option<u8> {
    let lsr = inb(COM1 + 5);
    (lsr != 0xff && lsr & 1 != 0).then(|| inb(COM1))
}

/// Buffered `core::fmt` sink for the console; flushes when full and when
/// dropped.
#[derive(Debug)]
pub struct Console {
    buf: [MaybeUninit<u8>; BUF],
    len: usize,
}

impl Default for Console {
    fn default() -> Self {
        Self {
            buf: [MaybeUninit::uninit(); BUF],
            len: 0,
        }
    }
}

impl Console {
    fn push(&mut self, b: u8) {
        if self.len == BUF {
            self.flush();
        }
        self.buf[self.len].write(b);
        self.len += 1;
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        for b in &self.buf[..self.len] {
            // SAFETY: the first `len` bytes were written by `push`.
            outb(COM1, unsafe { b.assume_init() });
        }
        self.len = 0;
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.push(b'\r');
            }
            self.push(b);
        }
        Ok(())
    }
}

/// Prints a formatted line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::hw::serial::Console::default();
        let _ = writeln!(c, $($arg)*);
    }};
}

/// Prints formatted text to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::hw::serial::Console::default();
        let _ = write!(c, $($arg)*);
    }};
}
