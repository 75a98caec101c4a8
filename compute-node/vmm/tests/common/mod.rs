//! Shared helpers for the crate tests: tiny PVH guests built byte by byte,
//! and running `neph-vmm` as a child process that is always killed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Where the tiny guests are loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// 32-bit guest programs, assembled from `tests/guests/*.s` (see the README
/// there for how to regenerate them).
pub mod programs {
    /// Prints "OK\n" on COM1 and powers off (port 0x600 = 0x34).
    pub const OK: &str = "66baf803b04feeb04beeb00aee66ba0006b034eef4ebfd";
    /// Prints "R\n" and resets through the i8042 (port 0x64 = 0xfe).
    pub const REBOOT: &str = "66baf803b052eeb00aee66ba6400b0feeef4ebfd";
    /// Prints "W\n", echoes serial input, and when the power button (port
    /// 0x602) reads 1 prints "B\n" and powers off.
    pub const WAIT: &str = "66baf803b057eeb00aee66bafd03eca801740666baf803ecee66ba0206eca80174e866baf803b042eeb00aee66ba0006b034eef4ebfd";
    /// Starts APIC ID 1 by INIT/SIPI at 0x8000 (a real-mode trampoline that
    /// prints "A\n" and sets byte 0x9000), prints "S1\n" when it came up or
    /// "S0\n" after a timeout, then powers off.
    /// A minimal virtio-rng driver: enables 00:01.0, negotiates
    /// VERSION_1, sets up queue 0 (8 entries) at 0x200000, asks for 16 bytes
    /// at 0x203000 and notifies; prints "V1\n" when 16 random bytes came
    /// back (else "V0\n"), then "N1\n" if the device status has
    /// DEVICE_NEEDS_RESET (else "N0\n"), then powers off.
    pub const VIRTIO_RNG: &str = "66baf80cb804080080ef66bafc0c66b8060066efbf0000200031c0b900400000f3aac605140000c000c605140000c001c605140000c003c705080000c001000000c7050c0000c001000000c605140000c00b66c705160000c0000066c705180000c00800c705200000c000002000c705240000c000000000c705280000c000102000c7052c0000c000000000c705300000c000202000c705340000c00000000066c7051c0000c00100c605140000c00fc7050000200000302000c7050400200000000000c705080020001000000066c7050c002000020066c7050e002000000066c70504102000000066c70502102000010066c705003000c00000b90000010066833d022020000174074975f3b330eb28b330833d0820200010751da1003020000b05043020000b05083020000b050c30200085c07402b33166baf803b056ee88d8eeb00aeeb04eeeb030f605140000c0407402b031eeb00aee66ba0006b034eef4ebfd";
    /// The same driver with its buffer at 0xfff00000, outside guest memory:
    /// a hostile descriptor. Expected: "V0\nN1\n".
    pub const VIRTIO_RNG_HOSTILE: &str = "66baf80cb804080080ef66bafc0c66b8060066efbf0000200031c0b900400000f3aac605140000c000c605140000c001c605140000c003c705080000c001000000c7050c0000c001000000c605140000c00b66c705160000c0000066c705180000c00800c705200000c000002000c705240000c000000000c705280000c000102000c7052c0000c000000000c705300000c000202000c705340000c00000000066c7051c0000c00100c605140000c00fc705000020000000f0ffc7050400200000000000c705080020001000000066c7050c002000020066c7050e002000000066c70504102000000066c70502102000010066c705003000c00000b90000010066833d022020000174074975f3b330eb28b330833d0820200010751da10000f0ff0b050400f0ff0b050800f0ff0b050c00f0ff85c07402b33166baf803b056ee88d8eeb00aeeb04eeeb030f605140000c0407402b031eeb00aee66ba0006b034eef4ebfd";
    /// Halts forever (ignores every request).
    pub const HALT: &str = "f4ebfd";
    pub const SMP: &str = "c6050090000000be7400000081c600001000bf00800000b911000000f3a4c7051003e0fe00000001c7050003e0fe00450000c7051003e0fe00000001c7050003e0fe08460000b900002000803d009000000174074975f4b330eb02b33166baf803b053ee88d8eeb00aee66ba0006b034eef4ebfdbaf803b041eeb00aeec606009001f4ebfd";
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// An ELF64 executable whose one loadable segment is `code` at
/// [`LOAD_ADDR`], with a Xen PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) naming
/// [`LOAD_ADDR`] as the 32-bit entry point.
pub fn pvh_elf(code_hex: &str) -> Vec<u8> {
    let code = hex(code_hex);
    let note_off = 64 + 2 * 56;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u32::try_from(LOAD_ADDR).unwrap().to_le_bytes());
    let code_off = 0x100;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let phdr =
        |e: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, len: u64, align: u64| {
            e.extend_from_slice(&kind.to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&off.to_le_bytes());
            e.extend_from_slice(&addr.to_le_bytes()); // vaddr
            e.extend_from_slice(&addr.to_le_bytes()); // paddr
            e.extend_from_slice(&len.to_le_bytes()); // filesz
            e.extend_from_slice(&len.to_le_bytes()); // memsz
            e.extend_from_slice(&align.to_le_bytes());
        };
    phdr(&mut e, 1, 5, code_off, LOAD_ADDR, code.len() as u64, 0x1000);
    phdr(&mut e, 4, 4, note_off, 0, note.len() as u64, 4);
    assert_eq!(e.len() as u64, note_off);
    e.extend_from_slice(&note);
    e.resize(usize::try_from(code_off).unwrap(), 0);
    e.extend_from_slice(&code);
    e
}

/// Whether this host can run guests; prints why not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "SKIP {test}: /dev/kvm is not usable here ({e}); guest boot tests need KVM and root"
            );
            false
        }
    }
}

/// A scratch directory with the guest written into it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn guest(&self, program: &str) -> PathBuf {
        let p = self.path("guest.elf");
        std::fs::write(&p, pvh_elf(program)).unwrap();
        p
    }
}

pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_neph-vmm"))
}

/// A running `neph-vmm`, killed on drop; its stdout arrives on a channel.
pub struct Vmm {
    pub child: Child,
    pub started: Instant,
    out: Receiver<Vec<u8>>,
    pub output: Vec<u8>,
    pub first_byte: Option<Duration>,
}

impl Vmm {
    pub fn spawn(args: &[&str]) -> Self {
        let started = Instant::now();
        let mut child = vmm()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            started,
            out: rx,
            output: Vec::new(),
            first_byte: None,
        }
    }

    /// Waits until stdout contains `needle` (true) or `timeout` passes.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&self.output).contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.out.recv_timeout(left) {
                Ok(chunk) => {
                    if self.first_byte.is_none() {
                        self.first_byte = Some(self.started.elapsed());
                    }
                    self.output.extend_from_slice(&chunk);
                }
                Err(_) => return String::from_utf8_lossy(&self.output).contains(needle),
            }
        }
    }

    /// Waits for the process to exit; None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while let Ok(chunk) = self.out.recv_timeout(Duration::from_millis(50)) {
                    self.output.extend_from_slice(&chunk);
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stdin(&mut self) -> &mut std::process::ChildStdin {
        self.child.stdin.as_mut().unwrap()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a unix socket to accept connections.
pub fn connect(path: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// One control request, one parsed answer.
pub fn api(stream: &mut UnixStream, request: &str) -> serde_json::Value {
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}
