//! The running guest: its devices and workloads, the shell loop that polls
//! console, network and workloads (halting until the next timer tick when
//! idle), and the command implementations with their result lines
//! (documented in `guest/README.md`).

use neph_guest::bootcfg::{self, BootConfig};
use neph_guest::checksum::{Fnv1a, SECTOR, fill_repeating, fill_sector};
use neph_guest::net::Ipv4Addr;
use neph_guest::shell::{Command, DirtyOp, Feed, HELP, LineEditor, TickerOp, parse_command};

use super::blk::{Blk, MAX_SECTORS};
use super::boot::MAPPED_LIMIT;
use super::clock::{self, Deadline};
use super::cpu;
use super::intr;
use super::nic::Nic;
use super::pci::{self, PciBus};
use super::platform::{self, Platform};
use super::rng::Rng;
use super::serial;
use super::workload::Dirtier;
use crate::{print, println};

/// The prompt.
pub const PROMPT: &str = "neph> ";
/// How often the host's shutdown request port is polled.
const SHUTDOWN_POLL_US: u64 = 10_000;

/// Everything the shell operates on.
#[derive(Debug)]
pub struct Machine {
    /// Boot facts.
    pub platform: Platform,
    /// Command-line configuration.
    pub config: BootConfig<'static>,
    /// PCI functions.
    pub pci: &'static PciBus,
    /// CPUs that answered INIT/SIPI, boot CPU included.
    pub cpus_online: u32,
    /// PCI memory BARs the guest assigned itself.
    pub bars_assigned: u32,
    /// Block device.
    pub blk: Option<Blk>,
    /// Network device.
    pub nic: Option<Nic>,
    /// Entropy device.
    pub rng: Option<Rng>,
    /// Memory dirtier.
    pub dirtier: Dirtier,
    /// `powerbutton ignore`: the host's shutdown requests are only
    /// reported, so the host has to force the VM off.
    pub ignore_power_button: bool,
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// `key=value` pairs separated by spaces.
struct Fields<'a>(&'a [(&'static str, u64)]);

impl core::fmt::Display for Fields<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{key}={value}")?;
        }
        Ok(())
    }
}

impl Machine {
    /// The `key=value` summary shared by the ready line and `info`.
    fn summary(&self) -> [(&'static str, u64); 7] {
        [
            ("mem_mib", self.platform.memmap.total_mib()),
            ("cpus", self.platform.cpus.total().max(1) as u64),
            ("cpus_online", u64::from(self.cpus_online)),
            ("pci", self.pci.devices().len() as u64),
            ("blk", u64::from(flag(self.blk.is_some()))),
            ("net", u64::from(flag(self.nic.is_some()))),
            ("rng", u64::from(flag(self.rng.is_some()))),
        ]
    }

    /// Prints the ready marker, runs the `run=` commands, then serves the
    /// shell forever.
    pub fn run(&mut self) -> ! {
        super::boot::stage(6);
        // Printed without `core::fmt`: this line is on every boot's
        // critical path (see `serial`).
        serial::put_str("NEPH-GUEST READY");
        let clocks = [
            ("boot_us", clock::since_entry_ns() / 1000),
            ("clock_us", clock::now_ns() / 1000),
        ];
        for (key, value) in self.summary().into_iter().chain(clocks) {
            serial::put_str(" ");
            serial::put_str(key);
            serial::put_str("=");
            serial::put_u64(value);
        }
        serial::put_str("\n");
        if let Some(run) = self.config.run {
            for cmd in bootcfg::commands(run) {
                println!("{PROMPT}{cmd}");
                self.execute(cmd);
            }
        }
        print!("{PROMPT}");
        let mut editor = LineEditor::default();
        let mut next_shutdown_poll = Deadline::after_us(SHUTDOWN_POLL_US);
        loop {
            if next_shutdown_poll.expired() {
                next_shutdown_poll = Deadline::after_us(SHUTDOWN_POLL_US);
                if platform::shutdown_requested() {
                    println!();
                    if self.ignore_power_button {
                        println!("NEPH-GUEST SHUTDOWN ignored (powerbutton ignore)");
                        print!("{PROMPT}");
                    } else {
                        println!("NEPH-GUEST SHUTDOWN requested by the host");
                        platform::poweroff();
                    }
                }
            }
            let mut busy = false;
            while let Some(b) = super::serial::try_read() {
                busy = true;
                match editor.feed(b) {
                    Feed::Nothing => {}
                    Feed::Echo(c) => super::serial::write_byte(c),
                    Feed::Erase => print!("\x08 \x08"),
                    Feed::Submit => {
                        println!();
                        let line = editor.take();
                        let mut copy = [0u8; neph_guest::shell::LINE_MAX];
                        copy[..line.len()].copy_from_slice(line.as_bytes());
                        let line = core::str::from_utf8(&copy[..line.len()]).unwrap_or("");
                        if !line.trim().is_empty() {
                            self.execute(line);
                        }
                        print!("{PROMPT}");
                    }
                }
            }
            if let Some(nic) = &mut self.nic {
                let before = nic.rx_frames;
                nic.poll();
                busy |= nic.rx_frames != before;
            }
            if self.dirtier.step() {
                busy = true;
            }
            // Idle (including a paced dirtier that is ahead of its rate):
            // sleep until the next timer tick.
            if !busy {
                cpu::wait_for_interrupt();
            }
        }
    }

    /// Runs one command line and prints its result lines.
    pub fn execute(&mut self, line: &str) {
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(neph_guest::shell::ParseCommandError::Empty) => return,
            Err(e) => {
                println!("ERR {e}");
                return;
            }
        };
        match cmd {
            Command::Help => {
                for l in HELP {
                    println!("  {l}");
                }
                println!("HELP OK");
            }
            Command::Info => self.info(),
            Command::Pci => {
                for d in self.pci.devices() {
                    println!(
                        "PCI {:02x}:{:02x}.{} vendor={:04x} device={:04x} class={:06x} driver={}",
                        d.bus,
                        d.dev,
                        d.func,
                        d.vendor,
                        d.device,
                        d.class,
                        pci::driver_name(d)
                    );
                }
                println!("PCI OK devices={}", self.pci.devices().len());
            }
            Command::Uptime => println!(
                "UPTIME OK us={} clock_us={} timer_ticks={}",
                clock::since_entry_ns() / 1000,
                clock::now_ns() / 1000,
                intr::TIMER_TICKS.load(core::sync::atomic::Ordering::Relaxed)
            ),
            Command::Echo(text) => println!("ECHO {text}"),
            Command::Poweroff => {
                println!("POWEROFF");
                platform::poweroff()
            }
            Command::Reboot => {
                println!("REBOOT");
                platform::reboot()
            }
            Command::PowerButton { ignore } => {
                self.ignore_power_button = ignore;
                let mode = if ignore { "ignore" } else { "obey" };
                println!("POWERBUTTON OK mode={mode}");
            }
            Command::BlkInfo | Command::BlkRead(_) | Command::BlkWrite(..) | Command::BlkFlush => {
                self.blk_cmd(cmd)
            }
            Command::Rng(n) => self.rng_cmd(n),
            Command::Net => match &self.nic {
                None => println!("NET ERR no network device"),
                Some(n) => {
                    print!("NET OK mac={} ip=", n.stack.mac);
                    match n.stack.cidr {
                        Some(c) => print!("{c}"),
                        None => print!("none"),
                    }
                    match n.stack.gw {
                        Some(g) => print!(" gw={g}"),
                        None => print!(" gw=none"),
                    }
                    println!(
                        " rx_frames={} tx_frames={} rx_errors={} arp_replies={} echo_replies={}",
                        n.rx_frames,
                        n.tx_frames,
                        n.rx_errors,
                        n.stack.arp_replies,
                        n.stack.echo_replies
                    );
                }
            },
            Command::Ping {
                ip,
                count,
                interval_ms,
            } => self.ping(ip, count, interval_ms),
            Command::Dirty(op) => self.dirty_cmd(op),
            Command::Ticker(op) => {
                if op == TickerOp::Start {
                    if intr::timer_hz() == 0 {
                        println!("TICKER ERR the LAPIC timer is not running");
                        return;
                    }
                    intr::ticker_start();
                    println!("TICKER OK started period_us=1000");
                    return;
                }
                let r = intr::ticker_report(op == TickerOp::Stop);
                println!(
                    "TICKER OK running={} max_gap_us={} ticks={} elapsed_ms={}",
                    flag(r.running),
                    r.max_gap_ns / 1000,
                    r.ticks,
                    r.elapsed_ns / 1_000_000
                );
            }
            Command::Checksum { addr, len } => {
                if !self.platform.memmap.contains(addr, len)
                    || addr.saturating_add(len) > MAPPED_LIMIT
                {
                    println!("CHECKSUM ERR range {addr:#x}+{len:#x} is not inside guest RAM");
                    return;
                }
                let Ok(n) = usize::try_from(len) else {
                    println!("CHECKSUM ERR length too large");
                    return;
                };
                let t0 = clock::now_ns();
                // SAFETY: the range is identity-mapped RAM (checked above);
                // reading it as bytes is fine even while the dirtier or the
                // device writes parts of it (plain bytes have no invalid
                // values; the checksum then reflects some interleaving).
                let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, n) };
                let mut h = Fnv1a::new();
                h.update(bytes);
                println!(
                    "CHECKSUM OK addr={addr:#x} len={len} fnv={:016x} us={}",
                    h.finish(),
                    clock::now_ns().saturating_sub(t0) / 1000
                );
            }
            Command::DiskWrite { lba, blocks, seed } => self.disk_workload(true, lba, blocks, seed),
            Command::DiskVerify { lba, blocks, seed } => {
                self.disk_workload(false, lba, blocks, seed)
            }
        }
    }

    fn info(&self) {
        print!(
            "INFO {} clock={} tsc_khz={} lapic_timer_khz={} cpu_source={} workload_mib={} pci_access={} bars_assigned={} ",
            Fields(&self.summary()),
            clock::source(),
            clock::tsc_hz() / 1000,
            intr::timer_hz() / 1000,
            self.platform.cpu_source.name(),
            self.dirtier.capacity_mib(),
            pci::access_name(),
            self.bars_assigned,
        );
        for (name, us) in super::boot::STAGE_NAMES.iter().zip(&super::boot::STAGES_US) {
            print!(
                "boot_{name}_us={} ",
                us.load(core::sync::atomic::Ordering::Relaxed)
            );
        }
        print!("cmdline=\"");
        for c in self.platform.cmdline.chars() {
            if c == '"' || c == '\\' {
                print!("\\");
            }
            print!("{c}");
        }
        println!("\"");
    }

    fn blk_cmd(&mut self, cmd: Command<'_>) {
        let Some(blk) = &mut self.blk else {
            println!("BLK ERR no block device");
            return;
        };
        let mut sector = [0u8; SECTOR];
        let result = match cmd {
            Command::BlkInfo => {
                println!(
                    "BLK OK capacity_sectors={} read_only={} flush={}",
                    blk.capacity,
                    flag(blk.read_only),
                    flag(blk.flush)
                );
                Ok(())
            }
            Command::BlkRead(lba) => blk.read(lba, &mut sector).map(|()| {
                print!(
                    "BLK OK read lba={lba} fnv={:016x} head=",
                    neph_guest::checksum::fnv1a64(&sector)
                );
                for &b in &sector[..32] {
                    super::serial::write_byte(if b.is_ascii_graphic() { b } else { b'.' });
                }
                println!();
            }),
            Command::BlkWrite(lba, pattern) => {
                fill_repeating(&mut sector, pattern.as_bytes());
                blk.write(lba, &sector).map(|()| {
                    println!(
                        "BLK OK write lba={lba} fnv={:016x}",
                        neph_guest::checksum::fnv1a64(&sector)
                    );
                })
            }
            Command::BlkFlush => blk.flush().map(|()| println!("BLK OK flush")),
            _ => Ok(()),
        };
        if let Err(e) = result {
            println!("BLK ERR {e}");
        }
    }

    fn rng_cmd(&mut self, n: usize) {
        let Some(rng) = &mut self.rng else {
            println!("RNG ERR no entropy device");
            return;
        };
        let mut buf = [0u8; super::rng::MAX_BYTES];
        match rng.fill(&mut buf[..n]) {
            Ok(got) => {
                print!("RNG OK bytes={got} hex=");
                for b in &buf[..got] {
                    print!("{b:02x}");
                }
                println!();
            }
            Err(e) => println!("RNG ERR {e}"),
        }
    }

    fn dirty_cmd(&mut self, op: DirtyOp) {
        match op {
            DirtyOp::Start { mib, mib_per_s } => match self.dirtier.start(mib, mib_per_s) {
                Ok(()) => println!(
                    "DIRTY OK started mib={mib} mib_per_s={mib_per_s} addr={:#x}",
                    self.dirtier.status().addr
                ),
                Err(e) => println!("DIRTY ERR {e}"),
            },
            DirtyOp::Stop | DirtyOp::Status => {
                if op == DirtyOp::Stop {
                    self.dirtier.stop();
                }
                let s = self.dirtier.status();
                println!(
                    "DIRTY OK running={} mib={} mib_per_s={} dirtied_mib={} passes={} elapsed_ms={} actual_mib_per_s={}",
                    flag(s.running),
                    s.mib,
                    s.mib_per_s,
                    s.dirtied_mib,
                    s.passes,
                    s.elapsed_ms,
                    s.actual_mib_per_s
                );
            }
        }
    }

    fn ping(&mut self, ip: Ipv4Addr, count: u32, interval_ms: u64) {
        let Some(nic) = &mut self.nic else {
            println!("PING ERR no network device");
            return;
        };
        let Some(hop) = nic.stack.next_hop(ip) else {
            println!("PING ERR no route to {ip} (set ip= and gw= on the command line)");
            return;
        };
        let mut mac = nic.stack.lookup(hop);
        for _ in 0..3 {
            if mac.is_some() {
                break;
            }
            if let Err(e) = nic.send_arp_request(hop) {
                println!("PING ERR {e}");
                return;
            }
            let d = Deadline::after_us(300_000);
            while mac.is_none() && !d.expired() {
                nic.poll();
                mac = nic.stack.lookup(hop);
            }
        }
        let Some(mac) = mac else {
            println!("PING ERR no ARP reply from {hop}");
            return;
        };
        let id = (cpu::rdtsc() & 0xffff) as u16;
        let (mut received, mut min, mut max, mut total) = (0u32, u64::MAX, 0u64, 0u64);
        let payload = *b"nephele-guest-ping-payload-0123456789abcdef";
        for seq in 1..=count {
            let seq16 = seq as u16;
            let t0 = clock::now_ns();
            match nic.send_echo_request(ip, mac, id, seq16, &payload) {
                Ok(true) => {}
                Ok(false) => {
                    println!("PING ERR cannot build the request");
                    return;
                }
                Err(e) => {
                    println!("PING ERR {e}");
                    return;
                }
            }
            let d = Deadline::after_us(1_000_000);
            let mut got = None;
            while got.is_none() && !d.expired() {
                if let Some((src, rid, rseq)) = nic.poll()
                    && src == ip
                    && rid == id
                    && rseq == seq16
                {
                    got = Some(clock::now_ns().saturating_sub(t0) / 1000);
                }
            }
            match got {
                Some(us) => {
                    received += 1;
                    min = min.min(us);
                    max = max.max(us);
                    total += us;
                    println!("PING reply seq={seq} from={ip} time_us={us}");
                }
                None => println!("PING timeout seq={seq}"),
            }
            if seq < count {
                let d = Deadline::after_us(interval_ms * 1000);
                while !d.expired() {
                    nic.poll();
                }
            }
        }
        if received == 0 {
            println!("PING ERR sent={count} received=0");
        } else {
            println!(
                "PING OK sent={count} received={received} min_us={min} avg_us={} max_us={max}",
                total / u64::from(received)
            );
        }
    }

    fn disk_workload(&mut self, write: bool, lba: u64, blocks: u64, seed: u64) {
        let tag = if write { "DISKWRITE" } else { "DISKVERIFY" };
        let Some(blk) = &mut self.blk else {
            println!("{tag} ERR no block device");
            return;
        };
        let t0 = clock::now_ns();
        let mut buf = [0u8; MAX_SECTORS * SECTOR];
        let mut expect = [0u8; SECTOR];
        let mut hash = Fnv1a::new();
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(MAX_SECTORS as u64) as usize;
            let chunk = &mut buf[..n * SECTOR];
            let at = lba + done;
            if write {
                for (i, s) in chunk.chunks_exact_mut(SECTOR).enumerate() {
                    fill_sector(&mut expect, seed, at + i as u64);
                    s.copy_from_slice(&expect);
                }
                if let Err(e) = blk.write(at, chunk) {
                    println!("{tag} ERR lba={at}: {e}");
                    return;
                }
            } else {
                if let Err(e) = blk.read(at, chunk) {
                    println!("{tag} ERR lba={at}: {e}");
                    return;
                }
                for (i, s) in chunk.chunks_exact(SECTOR).enumerate() {
                    fill_sector(&mut expect, seed, at + i as u64);
                    if s != expect {
                        println!("{tag} ERR mismatch lba={}", at + i as u64);
                        return;
                    }
                }
            }
            hash.update(chunk);
            done += n as u64;
        }
        if write && let Err(e) = blk.flush() {
            println!("{tag} ERR flush: {e}");
            return;
        }
        println!(
            "{tag} OK lba={lba} blocks={blocks} seed={seed} fnv={:016x} us={}",
            hash.finish(),
            clock::now_ns().saturating_sub(t0) / 1000
        );
    }
}
