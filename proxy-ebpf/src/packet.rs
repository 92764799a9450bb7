//! Parsing and rewriting IPv4 TCP/UDP packets in place, with incremental checksum updates.
//!
//! Reads and writes go through `bpf_skb_load_bytes`/`bpf_skb_store_bytes` at computed offsets,
//! so IP options (a variable header length) need no special case and the verifier needs no
//! packet-pointer bounds proofs.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::Broken;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

// Offsets inside the IPv4 header.
const IP_FRAG_OFF: usize = ETH_HLEN + 6;
const IP_PROTO: usize = ETH_HLEN + 9;
pub const IP_CHECK: usize = ETH_HLEN + 10;
pub const IP_SADDR: usize = ETH_HLEN + 12;
pub const IP_DADDR: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset: any of them set means "a fragment".
const IP_FRAGMENT_MASK: u16 = 0x3fff;

// Offsets inside the TCP and UDP headers.
const L4_SPORT: usize = 0;
const L4_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the pipeline needs of a packet. Addresses and ports in network byte order.
pub struct Packet {
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    pub ihl_bytes: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
}

impl Packet {
    pub fn ct_key(&self, direction: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            direction,
            _pad: 0,
        }
    }

    pub fn has_tcp_flag(&self, flags: u8) -> bool {
        self.tcp_flags & flags != 0
    }

    /// The first packet of a TCP connection: SYN without ACK.
    pub fn is_tcp_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    fn l4_check_off(&self) -> usize {
        self.l4_off
            + if self.proto == IPPROTO_TCP {
                TCP_CHECK
            } else {
                UDP_CHECK
            }
    }

    /// Flags for `bpf_l4_csum_replace`: a UDP checksum of zero means "none" and must stay zero
    /// (and a computed zero is sent as 0xffff), which BPF_F_MARK_MANGLED_0 does.
    fn l4_csum_flags(&self) -> u64 {
        if self.proto == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

/// IPv4 TCP or UDP, not a fragment: everything else is not ours and passes untouched.
/// (Non-first fragments carry no ports; translating them needs a fragment map, a later step.)
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let ether_type: u16 = ctx.load(12).ok()?;
    if u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl_bytes = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl_bytes < 20 {
        return None;
    }
    let frag_off: u16 = ctx.load(IP_FRAG_OFF).ok()?;
    if u16::from_be(frag_off) & IP_FRAGMENT_MASK != 0 {
        return None;
    }
    let proto: u8 = ctx.load(IP_PROTO).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4_off = ETH_HLEN + ihl_bytes;
    let tcp_flags = if proto == IPPROTO_TCP {
        ctx.load(l4_off + TCP_FLAGS).ok()?
    } else {
        0
    };
    Some(Packet {
        l4_off,
        ihl_bytes,
        saddr: ctx.load(IP_SADDR).ok()?,
        daddr: ctx.load(IP_DADDR).ok()?,
        sport: ctx.load(l4_off + L4_SPORT).ok()?,
        dport: ctx.load(l4_off + L4_DPORT).ok()?,
        proto,
        tcp_flags,
    })
}

/// Rewrites the destination address and port.
pub fn rewrite_destination(
    ctx: &TcContext,
    pkt: &Packet,
    addr: u32,
    port: u16,
) -> Result<(), Broken> {
    rewrite_addr(ctx, pkt, IP_DADDR, pkt.daddr, addr)?;
    rewrite_port(ctx, pkt, pkt.l4_off + L4_DPORT, pkt.dport, port)
}

/// Rewrites the source address and port.
pub fn rewrite_source(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), Broken> {
    rewrite_addr(ctx, pkt, IP_SADDR, pkt.saddr, addr)?;
    rewrite_port(ctx, pkt, pkt.l4_off + L4_SPORT, pkt.sport, port)
}

/// An address is in the IP header checksum and, through the pseudo-header, in the L4 one.
fn rewrite_addr(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old: u32,
    new: u32,
) -> Result<(), Broken> {
    if old == new {
        return Ok(());
    }
    ctx.store(offset, &new, 0).map_err(|_| Broken)?;
    ctx.l3_csum_replace(IP_CHECK, u64::from(old), u64::from(new), 4)
        .map_err(|_| Broken)?;
    let flags = pkt.l4_csum_flags() | u64::from(BPF_F_PSEUDO_HDR) | 4;
    ctx.l4_csum_replace(pkt.l4_check_off(), u64::from(old), u64::from(new), flags)
        .map_err(|_| Broken)
}

fn rewrite_port(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), Broken> {
    if old == new {
        return Ok(());
    }
    ctx.store(offset, &new, 0).map_err(|_| Broken)?;
    let flags = pkt.l4_csum_flags() | 2;
    ctx.l4_csum_replace(pkt.l4_check_off(), u64::from(old), u64::from(new), flags)
        .map_err(|_| Broken)
}
