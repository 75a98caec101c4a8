//! Ethernet, ARP, IPv4 and ICMP echo for the test guest: parsing (defensive:
//! frames come from the network), building, and [`NetStack`], which answers
//! ARP requests and pings for the guest's address and tracks the neighbours
//! it learned.

use core::fmt;

/// Ethernet header length.
pub const ETH_HDR: usize = 14;
/// Minimum Ethernet frame length without FCS; shorter frames are padded.
pub const ETH_MIN: usize = 60;
/// Largest frame the guest sends or accepts (no jumbo frames).
pub const ETH_MAX: usize = 1514;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IPV4_HDR: usize = 20;
const ICMP_HDR: usize = 8;
const PROTO_ICMP: u8 = 1;
/// ARP request opcode.
pub const ARP_REQUEST: u16 = 1;
/// ARP reply opcode.
pub const ARP_REPLY: u16 = 2;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// An IPv4 address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Addr(pub [u8; 4]);

impl Ipv4Addr {
    /// Unspecified address.
    pub const UNSPECIFIED: Self = Self([0; 4]);

    /// Parses dotted-quad notation.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = [0u8; 4];
        let mut parts = s.split('.');
        for o in &mut out {
            let p = parts.next()?;
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *o = p.parse().ok()?;
        }
        parts.next().is_none().then_some(Self(out))
    }

    fn to_u32(self) -> u32 {
        u32::from_be_bytes(self.0)
    }
}

impl fmt::Display for Ipv4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// An address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Parses `A.B.C.D/N`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/')?;
        let prefix: u8 = p.parse().ok().filter(|&p| p <= 32)?;
        Some(Self {
            addr: Ipv4Addr::parse(a)?,
            prefix,
        })
    }

    /// Whether `ip` is on this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        (self.addr.to_u32() ^ ip.to_u32()) & mask == 0
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff
    pub const BROADCAST: Self = Self([0xff; 6]);
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// RFC 1071 Internet checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in chunks.by_ref() {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP packet (Ethernet/IPv4 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// Opcode.
    pub op: u16,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// An ICMP echo request or reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo<'a> {
    /// True for a request, false for a reply.
    pub request: bool,
    /// Ethernet source.
    pub src_mac: MacAddr,
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination.
    pub dst: Ipv4Addr,
    /// Identifier.
    pub id: u16,
    /// Sequence number.
    pub seq: u16,
    /// Payload.
    pub payload: &'a [u8],
}

/// What a received frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// ARP.
    Arp(Arp),
    /// ICMP echo request/reply.
    Echo(Echo<'a>),
    /// Anything else, or malformed.
    Other,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> MacAddr {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    MacAddr(m)
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    Ipv4Addr(a)
}

/// Classifies a received Ethernet frame; malformed frames are [`Packet::Other`].
pub fn parse(frame: &[u8]) -> Packet<'_> {
    if frame.len() < ETH_HDR {
        return Packet::Other;
    }
    let body = &frame[ETH_HDR..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(body).map_or(Packet::Other, Packet::Arp),
        ETHERTYPE_IPV4 => parse_icmp(mac_at(frame, 6), body).map_or(Packet::Other, Packet::Echo),
        _ => Packet::Other,
    }
}

fn parse_arp(b: &[u8]) -> Option<Arp> {
    if b.len() < ARP_LEN
        || be16(b, 0) != 1
        || be16(b, 2) != ETHERTYPE_IPV4
        || b[4] != 6
        || b[5] != 4
    {
        return None;
    }
    Some(Arp {
        op: be16(b, 6),
        sha: mac_at(b, 8),
        spa: ip_at(b, 14),
        tha: mac_at(b, 18),
        tpa: ip_at(b, 24),
    })
}

fn parse_icmp(src_mac: MacAddr, b: &[u8]) -> Option<Echo<'_>> {
    if b.len() < IPV4_HDR || b[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0xf) * 4;
    let total = usize::from(be16(b, 2));
    if ihl < IPV4_HDR || total < ihl + ICMP_HDR || total > b.len() {
        return None;
    }
    // No fragments: MF set or a non-zero offset.
    if be16(b, 6) & 0x3fff != 0 || b[9] != PROTO_ICMP || internet_checksum(&b[..ihl]) != 0 {
        return None;
    }
    let icmp = &b[ihl..total];
    if internet_checksum(icmp) != 0 || icmp[1] != 0 {
        return None;
    }
    let request = match icmp[0] {
        ICMP_ECHO_REQUEST => true,
        ICMP_ECHO_REPLY => false,
        _ => return None,
    };
    Some(Echo {
        request,
        src_mac,
        src: ip_at(b, 12),
        dst: ip_at(b, 16),
        id: be16(icmp, 4),
        seq: be16(icmp, 6),
        payload: &icmp[ICMP_HDR..],
    })
}

fn eth_header(out: &mut [u8], dst: MacAddr, src: MacAddr, ethertype: u16) {
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

fn pad(out: &mut [u8], len: usize) -> usize {
    if len < ETH_MIN {
        out[len..ETH_MIN].fill(0);
        ETH_MIN
    } else {
        len
    }
}

/// Builds an ARP frame into `out`; returns its length, or `None` if `out` is
/// shorter than [`ETH_MIN`].
pub fn build_arp(out: &mut [u8], eth_dst: MacAddr, arp: &Arp) -> Option<usize> {
    if out.len() < ETH_MIN {
        return None;
    }
    eth_header(out, eth_dst, arp.sha, ETHERTYPE_ARP);
    let b = &mut out[ETH_HDR..ETH_HDR + ARP_LEN];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    b[4] = 6;
    b[5] = 4;
    b[6..8].copy_from_slice(&arp.op.to_be_bytes());
    b[8..14].copy_from_slice(&arp.sha.0);
    b[14..18].copy_from_slice(&arp.spa.0);
    b[18..24].copy_from_slice(&arp.tha.0);
    b[24..28].copy_from_slice(&arp.tpa.0);
    Some(pad(out, ETH_HDR + ARP_LEN))
}

/// Builds an ICMP echo frame (request or reply per `echo.request`) from
/// `echo.src_mac`/`echo.src` to `dst_mac`/`echo.dst`; returns its length, or
/// `None` if it does not fit in `out` or exceeds [`ETH_MAX`].
pub fn build_echo(out: &mut [u8], dst_mac: MacAddr, echo: &Echo<'_>, ip_id: u16) -> Option<usize> {
    let icmp_len = ICMP_HDR + echo.payload.len();
    let ip_len = IPV4_HDR + icmp_len;
    let len = ETH_HDR + ip_len;
    if len > out.len().min(ETH_MAX) || out.len() < ETH_MIN {
        return None;
    }
    eth_header(out, dst_mac, echo.src_mac, ETHERTYPE_IPV4);
    let ip = &mut out[ETH_HDR..ETH_HDR + IPV4_HDR];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&u16::try_from(ip_len).ok()?.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTO_ICMP;
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&echo.src.0);
    ip[16..20].copy_from_slice(&echo.dst.0);
    let sum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut out[ETH_HDR + IPV4_HDR..len];
    icmp[0] = if echo.request {
        ICMP_ECHO_REQUEST
    } else {
        ICMP_ECHO_REPLY
    };
    icmp[1] = 0;
    icmp[2..4].fill(0);
    icmp[4..6].copy_from_slice(&echo.id.to_be_bytes());
    icmp[6..8].copy_from_slice(&echo.seq.to_be_bytes());
    icmp[8..].copy_from_slice(echo.payload);
    let sum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(pad(out, len))
}

const ARP_CACHE: usize = 16;

/// What [`NetStack::handle`] did with a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handled {
    /// A reply was built into the output buffer with this length: send it.
    pub reply_len: Option<usize>,
    /// An echo reply addressed to us arrived: `(source, id, seq)`.
    pub echo_reply: Option<(Ipv4Addr, u16, u16)>,
}

/// The guest's IPv4 endpoint on one NIC.
#[derive(Clone, Debug)]
pub struct NetStack {
    /// Our MAC.
    pub mac: MacAddr,
    /// Our address, if configured.
    pub cidr: Option<Ipv4Cidr>,
    /// Default gateway, if configured.
    pub gw: Option<Ipv4Addr>,
    neighbours: [(Ipv4Addr, MacAddr); ARP_CACHE],
    next_slot: usize,
    ip_id: u16,
    /// ARP requests answered.
    pub arp_replies: u64,
    /// Echo requests answered.
    pub echo_replies: u64,
}

impl NetStack {
    /// A stack for `mac`, with an optional address and gateway.
    pub fn new(mac: MacAddr, cidr: Option<Ipv4Cidr>, gw: Option<Ipv4Addr>) -> Self {
        Self {
            mac,
            cidr,
            gw,
            neighbours: [(Ipv4Addr::UNSPECIFIED, MacAddr::default()); ARP_CACHE],
            next_slot: 0,
            ip_id: 1,
            arp_replies: 0,
            echo_replies: 0,
        }
    }

    fn our_ip(&self) -> Option<Ipv4Addr> {
        self.cidr.map(|c| c.addr)
    }

    /// The MAC learned for `ip`.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.neighbours
            .iter()
            .find(|(a, _)| *a == ip && ip != Ipv4Addr::UNSPECIFIED)
            .map(|(_, m)| *m)
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        if ip == Ipv4Addr::UNSPECIFIED || mac == MacAddr::BROADCAST || mac.0[0] & 1 != 0 {
            return;
        }
        if let Some(slot) = self.neighbours.iter_mut().find(|(a, _)| *a == ip) {
            slot.1 = mac;
            return;
        }
        self.neighbours[self.next_slot] = (ip, mac);
        self.next_slot = (self.next_slot + 1) % ARP_CACHE;
    }

    /// Where a packet for `dst` goes first: `dst` itself on our subnet, else
    /// the gateway. `None` without an address or a route.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let cidr = self.cidr?;
        if cidr.contains(dst) {
            Some(dst)
        } else {
            self.gw
        }
    }

    /// Handles one received frame, building a reply into `out` when one is due.
    pub fn handle(&mut self, frame: &[u8], out: &mut [u8]) -> Handled {
        let mut h = Handled::default();
        let Some(me) = self.our_ip() else {
            return h;
        };
        match parse(frame) {
            Packet::Arp(arp) => {
                if arp.tpa == me {
                    self.learn(arp.spa, arp.sha);
                }
                if arp.op == ARP_REPLY {
                    self.learn(arp.spa, arp.sha);
                }
                if arp.op == ARP_REQUEST && arp.tpa == me {
                    let reply = Arp {
                        op: ARP_REPLY,
                        sha: self.mac,
                        spa: me,
                        tha: arp.sha,
                        tpa: arp.spa,
                    };
                    h.reply_len = build_arp(out, arp.sha, &reply);
                    self.arp_replies += u64::from(h.reply_len.is_some());
                }
            }
            Packet::Echo(e) if e.dst == me => {
                self.learn(e.src, e.src_mac);
                if e.request {
                    let reply = Echo {
                        request: false,
                        src_mac: self.mac,
                        src: me,
                        dst: e.src,
                        ..e
                    };
                    self.ip_id = self.ip_id.wrapping_add(1);
                    h.reply_len = build_echo(out, e.src_mac, &reply, self.ip_id);
                    self.echo_replies += u64::from(h.reply_len.is_some());
                } else {
                    h.echo_reply = Some((e.src, e.id, e.seq));
                }
            }
            _ => {}
        }
        h
    }

    /// Builds a broadcast ARP request for `target`.
    pub fn arp_request(&self, out: &mut [u8], target: Ipv4Addr) -> Option<usize> {
        let arp = Arp {
            op: ARP_REQUEST,
            sha: self.mac,
            spa: self.our_ip()?,
            tha: MacAddr::default(),
            tpa: target,
        };
        build_arp(out, MacAddr::BROADCAST, &arp)
    }

    /// Builds an echo request to `dst` via `dst_mac`.
    pub fn echo_request(
        &mut self,
        out: &mut [u8],
        dst: Ipv4Addr,
        dst_mac: MacAddr,
        id: u16,
        seq: u16,
        payload: &[u8],
    ) -> Option<usize> {
        let e = Echo {
            request: true,
            src_mac: self.mac,
            src: self.our_ip()?,
            dst,
            id,
            seq,
            payload,
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        build_echo(out, dst_mac, &e, self.ip_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const HOST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);
    const GUEST: Ipv4Addr = Ipv4Addr([10, 0, 2, 15]);
    const HOST: Ipv4Addr = Ipv4Addr([10, 0, 2, 2]);

    fn stack() -> NetStack {
        NetStack::new(
            GUEST_MAC,
            Some(Ipv4Cidr {
                addr: GUEST,
                prefix: 24,
            }),
            Some(HOST),
        )
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2u16);
        assert_eq!(internet_checksum(&[]), 0xffff);
        assert_eq!(internet_checksum(&[0x12]), !0x1200u16);
    }

    #[test]
    fn addresses_parse_and_print() {
        assert_eq!(Ipv4Addr::parse("10.0.2.15"), Some(GUEST));
        assert_eq!(Ipv4Addr::parse("256.0.0.1"), None);
        assert_eq!(Ipv4Addr::parse("1.2.3.4.5"), None);
        assert_eq!(Ipv4Addr::parse("1..3.4"), None);
        assert_eq!(GUEST.to_string(), "10.0.2.15");
        assert_eq!(GUEST_MAC.to_string(), "52:54:00:12:34:56");
        let c = Ipv4Cidr::parse("10.0.2.15/24").unwrap();
        assert!(c.contains(HOST));
        assert!(!c.contains(Ipv4Addr([10, 0, 3, 1])));
        assert!(
            Ipv4Cidr::parse("10.0.2.15/0")
                .unwrap()
                .contains(Ipv4Addr([1, 1, 1, 1]))
        );
        assert!(!Ipv4Cidr::parse("10.0.2.15/32").unwrap().contains(HOST));
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let mut s = stack();
        let mut req = [0u8; 64];
        let host = NetStack::new(
            HOST_MAC,
            Some(Ipv4Cidr {
                addr: HOST,
                prefix: 24,
            }),
            None,
        );
        let n = host.arp_request(&mut req, GUEST).unwrap();
        assert_eq!(n, ETH_MIN);
        let mut out = [0u8; 128];
        let h = s.handle(&req[..n], &mut out);
        let len = h.reply_len.unwrap();
        match parse(&out[..len]) {
            Packet::Arp(a) => {
                assert_eq!(a.op, ARP_REPLY);
                assert_eq!(a.sha, GUEST_MAC);
                assert_eq!(a.spa, GUEST);
                assert_eq!(a.tha, HOST_MAC);
                assert_eq!(a.tpa, HOST);
            }
            other => panic!("not ARP: {other:?}"),
        }
        assert_eq!(&out[0..6], &HOST_MAC.0);
        assert_eq!(s.lookup(HOST), Some(HOST_MAC));
        let n = host
            .arp_request(&mut req, Ipv4Addr([10, 0, 2, 99]))
            .unwrap();
        assert_eq!(s.handle(&req[..n], &mut out).reply_len, None);
    }

    #[test]
    fn answers_pings_and_reports_replies() {
        let mut s = stack();
        let mut host = NetStack::new(
            HOST_MAC,
            Some(Ipv4Cidr {
                addr: HOST,
                prefix: 24,
            }),
            None,
        );
        let mut req = [0u8; 256];
        let n = host
            .echo_request(&mut req, GUEST, GUEST_MAC, 7, 3, b"hello")
            .unwrap();
        let mut out = [0u8; 256];
        let h = s.handle(&req[..n], &mut out);
        let len = h.reply_len.unwrap();
        match parse(&out[..len]) {
            Packet::Echo(e) => {
                assert!(!e.request);
                assert_eq!((e.src, e.dst, e.id, e.seq), (GUEST, HOST, 7, 3));
                assert_eq!(e.payload, b"hello");
            }
            other => panic!("not an echo: {other:?}"),
        }
        // The host stack sees our reply as a reply to its ping.
        let mut sink = [0u8; 256];
        let h = host.handle(&out[..len], &mut sink);
        assert_eq!(h.echo_reply, Some((GUEST, 7, 3)));
        assert_eq!(h.reply_len, None);
    }

    #[test]
    fn corrupt_frames_are_ignored() {
        let mut s = stack();
        let mut host = NetStack::new(
            HOST_MAC,
            Some(Ipv4Cidr {
                addr: HOST,
                prefix: 24,
            }),
            None,
        );
        let mut req = [0u8; 256];
        let n = host
            .echo_request(&mut req, GUEST, GUEST_MAC, 1, 1, b"abcd")
            .unwrap();
        let mut out = [0u8; 256];
        // Every truncation and every single-bit flip in the IP/ICMP part must
        // be rejected or harmless, never panic.
        for cut in 0..n {
            let _ = s.handle(&req[..cut], &mut out);
        }
        for i in ETH_HDR..n {
            let mut bad = req;
            bad[i] ^= 0x10;
            let h = s.handle(&bad[..n], &mut out);
            if i < ETH_HDR + 20 + 8 + 4 {
                // Every IP and ICMP byte is covered by a checksum.
                assert_eq!(h.reply_len, None, "flip at {i} accepted");
            }
        }
        assert_eq!(parse(&[0u8; 3]), Packet::Other);
        // Total length larger than the frame.
        let mut bad = req;
        bad[ETH_HDR + 2] = 0xff;
        assert_eq!(parse(&bad[..n]), Packet::Other);
    }

    #[test]
    fn routes_via_gateway_off_subnet() {
        let s = stack();
        assert_eq!(
            s.next_hop(Ipv4Addr([10, 0, 2, 7])),
            Some(Ipv4Addr([10, 0, 2, 7]))
        );
        assert_eq!(s.next_hop(Ipv4Addr([8, 8, 8, 8])), Some(HOST));
        let none = NetStack::new(GUEST_MAC, None, None);
        assert_eq!(none.next_hop(HOST), None);
    }

    #[test]
    fn oversized_echo_is_refused() {
        let mut s = stack();
        let mut out = [0u8; 2048];
        let payload = [0u8; 1500];
        assert_eq!(
            s.echo_request(&mut out, HOST, HOST_MAC, 1, 1, &payload),
            None
        );
        assert!(
            s.echo_request(&mut out, HOST, HOST_MAC, 1, 1, &payload[..1400])
                .is_some()
        );
    }
}
