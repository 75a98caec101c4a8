//! Kernel command line of the test guest.
//!
//! Words are separated by spaces; a value may be double-quoted to hold
//! spaces (`run="ticker start; dirty 64 0"`). Keys:
//! - `ip=A.B.C.D/N`: the guest's IPv4 address and prefix on its first NIC;
//! - `gw=A.B.C.D`: default gateway;
//! - `run=CMD[;CMD...]`: shell commands run after the ready marker, in order
//!   (commas may stand for spaces: `run=ticker,start;dirty,64,0`).
//!
//! Unknown words (e.g. `console=ttyS0`) are ignored, so the same command line
//! can be shared with Linux guests.

use crate::net::{Ipv4Addr, Ipv4Cidr};

/// What the command line asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootConfig<'a> {
    /// `ip=`.
    pub ip: Option<Ipv4Cidr>,
    /// `gw=`.
    pub gw: Option<Ipv4Addr>,
    /// `run=` (unsplit; see [`commands`]).
    pub run: Option<&'a str>,
    /// The first word that had a known key but a bad value.
    pub bad: Option<&'a str>,
}

/// Splits a command line into words, honouring double quotes.
pub fn words(cmdline: &str) -> impl Iterator<Item = &str> {
    let mut rest = cmdline;
    core::iter::from_fn(move || {
        rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        if rest.is_empty() {
            return None;
        }
        let mut in_quotes = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if c == '"' {
                in_quotes = !in_quotes;
            } else if c.is_ascii_whitespace() && !in_quotes {
                end = i;
                break;
            }
        }
        let (word, tail) = rest.split_at(end);
        rest = tail;
        Some(word)
    })
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .map(|v| v.strip_suffix('"').unwrap_or(v))
        .unwrap_or(v)
}

impl<'a> BootConfig<'a> {
    /// Parses the command line; never fails (bad values are recorded in
    /// [`BootConfig::bad`] and otherwise ignored).
    pub fn parse(cmdline: &'a str) -> Self {
        let mut cfg = BootConfig::default();
        for word in words(cmdline) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(unquote(v))),
                None => (word, None),
            };
            match (key, value) {
                ("ip", Some(v)) => match Ipv4Cidr::parse(v) {
                    Some(c) => cfg.ip = Some(c),
                    None => cfg.bad = cfg.bad.or(Some(word)),
                },
                ("gw", Some(v)) => match Ipv4Addr::parse(v) {
                    Some(a) => cfg.gw = Some(a),
                    None => cfg.bad = cfg.bad.or(Some(word)),
                },
                ("run", Some(v)) => cfg.run = Some(v),
                _ => {}
            }
        }
        cfg
    }
}

/// The individual commands of a `run=` value.
pub fn commands(run: &str) -> impl Iterator<Item = &str> {
    run.split(';').map(str::trim).filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_honour_quotes() {
        let w: Vec<_> = words("  a b=\"x y\"  c=1 ").collect();
        assert_eq!(w, ["a", "b=\"x y\"", "c=1"]);
        assert_eq!(words("").count(), 0);
        let w: Vec<_> = words("run=\"unterminated x").collect();
        assert_eq!(w, ["run=\"unterminated x"]);
    }

    #[test]
    fn keys_parse() {
        let c = BootConfig::parse(
            "console=ttyS0 ip=10.0.2.15/24 gw=10.0.2.2 run=\"ticker start; dirty 8 0\"",
        );
        assert_eq!(c.ip.unwrap().addr, Ipv4Addr([10, 0, 2, 15]));
        assert_eq!(c.ip.unwrap().prefix, 24);
        assert_eq!(c.gw, Some(Ipv4Addr([10, 0, 2, 2])));
        assert!(c.bad.is_none());
        let cmds: Vec<_> = commands(c.run.unwrap()).collect();
        assert_eq!(cmds, ["ticker start", "dirty 8 0"]);
    }

    #[test]
    fn bad_values_are_reported_not_fatal() {
        let c = BootConfig::parse("ip=10.0.2/24 gw=1.2.3.4");
        assert!(c.ip.is_none());
        assert_eq!(c.bad, Some("ip=10.0.2/24"));
        assert_eq!(c.gw, Some(Ipv4Addr([1, 2, 3, 4])));
        let c = BootConfig::parse("ip=10.0.0.1/33");
        assert!(c.ip.is_none());
    }

    #[test]
    fn run_commands_split_on_semicolons() {
        let cmds: Vec<_> = commands("ticker,start;;  poweroff ;").collect();
        assert_eq!(cmds, ["ticker,start", "poweroff"]);
    }
}
