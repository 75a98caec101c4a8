//! The serial shell's grammar and line editor.
//!
//! Words are separated by spaces or commas (so `run=` on the kernel command
//! line can avoid quoting). Numbers are decimal or `0x` hex. See
//! `guest/README.md` for the result lines each command prints.

use crate::net::Ipv4Addr;
use crate::parse_u64;

/// What `ticker` should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TickerOp {
    /// Reset the statistics and start measuring.
    Start,
    /// Stop measuring and report.
    Stop,
    /// Report without stopping.
    Report,
}

/// What `dirty` should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyOp {
    /// Dirty `mib` MiB at `mib_per_s` MiB/s (0 = as fast as possible).
    Start {
        /// Size of the working set.
        mib: u64,
        /// Rate; 0 means unlimited.
        mib_per_s: u64,
    },
    /// Stop and report.
    Stop,
    /// Report without stopping.
    Status,
}

/// A parsed shell command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `help`
    Help,
    /// `info`
    Info,
    /// `pci`
    Pci,
    /// `uptime`
    Uptime,
    /// `echo TEXT...`
    Echo(&'a str),
    /// `poweroff`
    Poweroff,
    /// `reboot`
    Reboot,
    /// `powerbutton ignore|obey`: whether the host's shutdown request
    /// (the power button) is ignored.
    PowerButton {
        /// Ignore it (a guest that will not shut down).
        ignore: bool,
    },
    /// `blk info`
    BlkInfo,
    /// `blk read LBA`
    BlkRead(u64),
    /// `blk write LBA PATTERN`
    BlkWrite(u64, &'a str),
    /// `blk flush`
    BlkFlush,
    /// `rng N`
    Rng(usize),
    /// `net`
    Net,
    /// `ping IP [COUNT [INTERVAL_MS]]`
    Ping {
        /// Destination.
        ip: Ipv4Addr,
        /// Echo requests to send.
        count: u32,
        /// Pause between requests.
        interval_ms: u64,
    },
    /// `dirty MIB MIB_PER_S` / `dirty stop` / `dirty status`
    Dirty(DirtyOp),
    /// `ticker start|stop|report`
    Ticker(TickerOp),
    /// `checksum ADDR LEN`
    Checksum {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `diskwrite LBA BLOCKS SEED`
    DiskWrite {
        /// First sector.
        lba: u64,
        /// Sectors to write.
        blocks: u64,
        /// Pattern seed.
        seed: u64,
    },
    /// `diskverify LBA BLOCKS SEED`
    DiskVerify {
        /// First sector.
        lba: u64,
        /// Sectors to read back.
        blocks: u64,
        /// Pattern seed.
        seed: u64,
    },
}

/// Most bytes `rng` returns at once.
pub const RNG_MAX: usize = 4096;
/// Most echo requests one `ping` sends.
pub const PING_MAX: u32 = 10_000;

/// Why a line is not a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseCommandError<'a> {
    /// Blank line.
    #[error("empty line")]
    Empty,
    /// First word unknown.
    #[error("unknown command '{0}' (try 'help')")]
    Unknown(&'a str),
    /// Known command, bad arguments.
    #[error("usage: {0}")]
    Usage(&'static str),
}

/// One-line usage of every command, for `help`.
pub const HELP: &[&str] = &[
    "help | info | pci | uptime | echo TEXT | poweroff | reboot",
    "powerbutton ignore | powerbutton obey",
    "blk info | blk read LBA | blk write LBA PATTERN | blk flush",
    "rng N | net | ping IP [COUNT [INTERVAL_MS]]",
    "dirty MIB MIB_PER_S | dirty stop | dirty status",
    "ticker start | ticker stop | ticker report",
    "checksum ADDR LEN | diskwrite LBA BLOCKS SEED | diskverify LBA BLOCKS SEED",
];

fn is_sep(c: char) -> bool {
    c.is_ascii_whitespace() || c == ','
}

/// Parses one shell line.
pub fn parse_command(line: &str) -> Result<Command<'_>, ParseCommandError<'_>> {
    use Command as C;
    use ParseCommandError::{Empty, Unknown, Usage};
    let mut words = line.split(is_sep).filter(|w| !w.is_empty());
    let Some(cmd) = words.next() else {
        return Err(Empty);
    };
    let mut w = [""; 5];
    let mut n = 0;
    for word in words.by_ref() {
        if n == w.len() {
            n += 1;
            break;
        }
        w[n] = word;
        n += 1;
    }
    let num = |s: &str| parse_u64(s);
    let args = &w[..n.min(w.len())];
    let too_many = n > w.len();
    let parsed = match (cmd, args) {
        ("help", []) => Some(C::Help),
        ("info", []) => Some(C::Info),
        ("pci", []) => Some(C::Pci),
        ("uptime", []) => Some(C::Uptime),
        ("poweroff", []) => Some(C::Poweroff),
        ("reboot", []) => Some(C::Reboot),
        ("powerbutton", ["ignore"]) => Some(C::PowerButton { ignore: true }),
        ("powerbutton", ["obey"]) => Some(C::PowerButton { ignore: false }),
        ("net", []) => Some(C::Net),
        ("echo", _) => {
            // The text is the rest of the line as typed (commas kept), after
            // the separator that ended the word `echo`.
            let rest = line.trim_start().strip_prefix("echo").unwrap_or("");
            let rest = rest.strip_prefix(is_sep).unwrap_or(rest);
            return Ok(C::Echo(rest.trim()));
        }
        ("blk", ["info"]) => Some(C::BlkInfo),
        ("blk", ["flush"]) => Some(C::BlkFlush),
        ("blk", ["read", lba]) => num(lba).map(C::BlkRead),
        ("blk", ["write", lba, pat]) => num(lba).map(|l| C::BlkWrite(l, pat)),
        ("rng", [n]) => num(n)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| (1..=RNG_MAX).contains(&n))
            .map(C::Rng),
        ("ping", [ip, rest @ ..]) if rest.len() <= 2 => {
            let count = rest.first().map_or(Some(3), |c| num(c));
            let interval = rest.get(1).map_or(Some(200), |c| num(c));
            match (Ipv4Addr::parse(ip), count, interval) {
                (Some(ip), Some(count), Some(interval_ms))
                    if (1..=u64::from(PING_MAX)).contains(&count) && interval_ms <= 60_000 =>
                {
                    Some(C::Ping {
                        ip,
                        count: u32::try_from(count).unwrap_or(1),
                        interval_ms,
                    })
                }
                _ => None,
            }
        }
        ("dirty", ["stop"]) => Some(C::Dirty(DirtyOp::Stop)),
        ("dirty", ["status"]) => Some(C::Dirty(DirtyOp::Status)),
        ("dirty", [mib, rate]) => match (num(mib), num(rate)) {
            (Some(mib), Some(mib_per_s)) if mib > 0 => {
                Some(C::Dirty(DirtyOp::Start { mib, mib_per_s }))
            }
            _ => None,
        },
        ("ticker", ["start"]) => Some(C::Ticker(TickerOp::Start)),
        ("ticker", ["stop"]) => Some(C::Ticker(TickerOp::Stop)),
        ("ticker", ["report"]) => Some(C::Ticker(TickerOp::Report)),
        ("checksum", [a, l]) => match (num(a), num(l)) {
            (Some(addr), Some(len)) => Some(C::Checksum { addr, len }),
            _ => None,
        },
        ("diskwrite" | "diskverify", [l, b, s]) => match (num(l), num(b), num(s)) {
            (Some(lba), Some(blocks), Some(seed)) if blocks > 0 => Some(if cmd == "diskwrite" {
                C::DiskWrite { lba, blocks, seed }
            } else {
                C::DiskVerify { lba, blocks, seed }
            }),
            _ => None,
        },
        _ => None,
    };
    if let (Some(c), false) = (parsed, too_many) {
        return Ok(c);
    }
    Err(match cmd {
        "help" | "info" | "pci" | "uptime" | "poweroff" | "reboot" | "net" => Usage("no arguments"),
        "blk" => Usage("blk info | blk read LBA | blk write LBA PATTERN | blk flush"),
        "powerbutton" => Usage("powerbutton ignore | powerbutton obey"),
        "rng" => Usage("rng N (1..=4096)"),
        "ping" => Usage("ping IP [COUNT (1..=10000) [INTERVAL_MS (0..=60000)]]"),
        "dirty" => Usage("dirty MIB MIB_PER_S | dirty stop | dirty status"),
        "ticker" => Usage("ticker start | ticker stop | ticker report"),
        "checksum" => Usage("checksum ADDR LEN"),
        "diskwrite" => Usage("diskwrite LBA BLOCKS SEED"),
        "diskverify" => Usage("diskverify LBA BLOCKS SEED"),
        other => Unknown(other),
    })
}

/// Most bytes in one shell line.
pub const LINE_MAX: usize = 256;

/// What the terminal should show after a byte was fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Nothing to show.
    Nothing,
    /// Echo this byte.
    Echo(u8),
    /// Erase the last character on screen.
    Erase,
    /// A line is complete: call [`LineEditor::take`].
    Submit,
}

/// Accumulates typed bytes into lines (backspace, CR/LF/CRLF endings).
#[derive(Debug)]
pub struct LineEditor {
    buf: [u8; LINE_MAX],
    len: usize,
    last_cr: bool,
    ready: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
            last_cr: false,
            ready: false,
        }
    }
}

impl LineEditor {
    /// Feeds one byte from the console.
    pub fn feed(&mut self, b: u8) -> Feed {
        if self.ready {
            self.ready = false;
            self.len = 0;
        }
        let was_cr = core::mem::replace(&mut self.last_cr, b == b'\r');
        match b {
            b'\n' if was_cr => Feed::Nothing,
            b'\r' | b'\n' => {
                self.ready = true;
                Feed::Submit
            }
            0x08 | 0x7f => {
                if self.len > 0 {
                    self.len -= 1;
                    Feed::Erase
                } else {
                    Feed::Nothing
                }
            }
            0x20..=0x7e if self.len < LINE_MAX => {
                self.buf[self.len] = b;
                self.len += 1;
                Feed::Echo(b)
            }
            _ => Feed::Nothing,
        }
    }

    /// The submitted line (only printable ASCII, so always valid UTF-8).
    pub fn take(&mut self) -> &str {
        self.ready = true;
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command("help"), Ok(Command::Help));
        assert_eq!(parse_command("  blk read 0x10 "), Ok(Command::BlkRead(16)));
        assert_eq!(
            parse_command("blk write 5 hello"),
            Ok(Command::BlkWrite(5, "hello"))
        );
        assert_eq!(parse_command("rng 16"), Ok(Command::Rng(16)));
        assert_eq!(
            parse_command("ping 10.0.2.2"),
            Ok(Command::Ping {
                ip: Ipv4Addr([10, 0, 2, 2]),
                count: 3,
                interval_ms: 200
            })
        );
        assert_eq!(
            parse_command("ping 10.0.2.2 5 0"),
            Ok(Command::Ping {
                ip: Ipv4Addr([10, 0, 2, 2]),
                count: 5,
                interval_ms: 0
            })
        );
        assert_eq!(
            parse_command("dirty,64,0"),
            Ok(Command::Dirty(DirtyOp::Start {
                mib: 64,
                mib_per_s: 0
            }))
        );
        assert_eq!(
            parse_command("ticker stop"),
            Ok(Command::Ticker(TickerOp::Stop))
        );
        assert_eq!(
            parse_command("checksum 0x100000 4096"),
            Ok(Command::Checksum {
                addr: 0x100000,
                len: 4096
            })
        );
        assert_eq!(
            parse_command("diskverify 8 16 42"),
            Ok(Command::DiskVerify {
                lba: 8,
                blocks: 16,
                seed: 42
            })
        );
        assert_eq!(
            parse_command("echo  hi there "),
            Ok(Command::Echo("hi there"))
        );
        assert_eq!(parse_command("echo,hi"), Ok(Command::Echo("hi")));
        assert_eq!(parse_command("echo a,b"), Ok(Command::Echo("a,b")));
        assert_eq!(parse_command("echo"), Ok(Command::Echo("")));
        assert_eq!(
            parse_command("powerbutton ignore"),
            Ok(Command::PowerButton { ignore: true })
        );
        assert_eq!(
            parse_command("powerbutton,obey"),
            Ok(Command::PowerButton { ignore: false })
        );
    }

    #[test]
    fn bad_lines_give_reasons() {
        assert_eq!(parse_command("   "), Err(ParseCommandError::Empty));
        assert_eq!(
            parse_command("frob"),
            Err(ParseCommandError::Unknown("frob"))
        );
        assert!(matches!(
            parse_command("rng 0"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("rng 5000"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("blk read x"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("help me"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("ping 1.2.3"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("ping 1.2.3.4 0"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("dirty 0 5"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("diskwrite 1 2 3 4 5 6 7 8"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("diskwrite 1 0 3"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("powerbutton"),
            Err(ParseCommandError::Usage(_))
        ));
        assert!(matches!(
            parse_command("powerbutton press"),
            Err(ParseCommandError::Usage(_))
        ));
    }

    #[test]
    fn line_editor_handles_backspace_and_crlf() {
        let mut e = LineEditor::default();
        for &b in b"helq" {
            assert_eq!(e.feed(b), Feed::Echo(b));
        }
        assert_eq!(e.feed(0x7f), Feed::Erase);
        assert_eq!(e.feed(b'p'), Feed::Echo(b'p'));
        assert_eq!(e.feed(b'\r'), Feed::Submit);
        assert_eq!(e.take(), "help");
        assert_eq!(e.feed(b'\n'), Feed::Nothing);
        assert_eq!(e.feed(0x08), Feed::Nothing);
        assert_eq!(e.feed(0x1b), Feed::Nothing);
        assert_eq!(e.feed(b'x'), Feed::Echo(b'x'));
        assert_eq!(e.feed(b'\n'), Feed::Submit);
        assert_eq!(e.take(), "x");
        assert_eq!(e.feed(b'\n'), Feed::Submit);
        assert_eq!(e.take(), "");
    }

    #[test]
    fn overlong_lines_are_truncated() {
        let mut e = LineEditor::default();
        for _ in 0..LINE_MAX + 10 {
            e.feed(b'a');
        }
        assert_eq!(e.feed(b'\r'), Feed::Submit);
        assert_eq!(e.take().len(), LINE_MAX);
    }
}
