//! The 16550 UART at I/O port 0x3f8, polled: console output (with `\r\n`
//! line endings) and input for the shell, and the `print!`/`println!`
//! macros.
//!
//! Output goes out one `out` per byte (one VM exit each), straight from the
//! string being written: no intermediate buffer, because under PVM every
//! instruction that copies a byte is emulated too. A `rep outsb` would
//! batch a whole line into one exit, but VMMs built on kvm-ioctls see such
//! an exit as a single wide access to consecutive registers (its `IoOut`
//! data does not say whether the bytes are `count` writes to one port), so
//! it is not used. The transmitter is not polled: virtual UARTs take bytes
//! as fast as they come, and each poll would be another exit.
//!
//! [`put_str`] and [`put_u64`] print without `core::fmt`, whose machinery
//! (padding, dynamic dispatch per piece) costs hundreds of emulated
//! instructions per line: the boot path uses them for its lines.

use core::fmt;

use super::cpu::{inb, outb};

const COM1: u16 = 0x3f8;

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

/// Sends `s`, turning each `\n` into `\r\n`.
pub fn put_str(s: &str) {
    for &b in s.as_bytes() {
        if b == b'\n' {
            outb(COM1, b'\r');
        }
        outb(COM1, b);
    }
}

/// Sends `v` in decimal.
pub fn put_u64(v: u64) {
    let mut digits = [0u8; 20];
    for b in neph_guest::decimal(v, &mut digits) {
        outb(COM1, *b);
    }
}

/// The `core::fmt` sink for the console (unbuffered, see the module doc).
#[derive(Debug, Default)]
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put_str(s);
        Ok(())
    }
}

/// Prints a formatted line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::hw::serial::Console;
        let _ = writeln!(c, $($arg)*);
    }};
}

/// Prints formatted text to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::hw::serial::Console;
        let _ = write!(c, $($arg)*);
    }};
}
