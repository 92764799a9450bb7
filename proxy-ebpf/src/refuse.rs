//! Answers a new flow to a frontend with no backend at once, as kube-proxy's REJECT rule does:
//! a TCP RST for TCP, an ICMP port unreachable for UDP. The answer is built in place of the
//! packet (its frame trimmed to the answer's size) and sent back out of the device it came in on.
//!
//! Checksums are computed whole here, not patched: every header byte is new.
use aya_ebpf::{
    bindings::{__u32, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::IPPROTO_TCP;

use crate::Broken;
use crate::packet::{ETH_HLEN, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes of the offending datagram: its IP header and first 8 bytes.
const ICMP_QUOTE_LEN: usize = IP_HLEN + UDP_HLEN;

#[repr(C)]
#[derive(Clone, Copy)]
struct EthHeader {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    sport: u16,
    dport: u16,
    seq: u32,
    ack_seq: u32,
    data_offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urg_ptr: u16,
}

/// The TCP checksum covers this pseudo-header before the segment.
#[repr(C)]
#[derive(Clone, Copy)]
struct PseudoHeader {
    saddr: u32,
    daddr: u32,
    zero: u8,
    proto: u8,
    len: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpQuoted {
    kind: u8,
    code: u8,
    check: u16,
    unused: u32,
    quote: [u8; ICMP_QUOTE_LEN],
}

pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<i32, Broken> {
    let eth: EthHeader = ctx.load(0).map_err(|_| Broken)?;
    let reply_eth = EthHeader {
        dst: eth.src,
        src: eth.dst,
        ether_type: eth.ether_type,
    };
    if pkt.has_tcp_flag(TCP_RST) {
        // A RST is never answered (RFC 9293 3.10.7.1): there is nothing to reset.
        return Ok(TC_ACT_SHOT);
    }
    if pkt.proto == IPPROTO_TCP {
        tcp_reset(ctx, pkt)?;
    } else if pkt.ihl_bytes == IP_HLEN {
        port_unreachable(ctx, pkt)?;
    } else {
        // Quoting a header with options needs a variable-length copy; such datagrams are dropped
        // (the client times out instead of being refused at once).
        return Ok(TC_ACT_SHOT);
    }
    ctx.store(0, &reply_eth, 0).map_err(|_| Broken)?;
    // SAFETY: plain helper calls on the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Replaces the segment by a RST per RFC 9293 3.10.7.1: for a segment with ACK, the RST takes
/// its sequence number from that ACK; otherwise it acknowledges everything the segment occupied.
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), Broken> {
    let ip: Ipv4Header = ctx.load(ETH_HLEN).map_err(|_| Broken)?;
    let tcp: TcpHeader = ctx.load(pkt.l4_off).map_err(|_| Broken)?;
    let segment_len = u32::from(u16::from_be(ip.tot_len))
        .saturating_sub(pkt.ihl_bytes as u32)
        .saturating_sub(u32::from(tcp.data_offset >> 4) * 4);
    let (seq, ack_seq, flags) = if tcp.flags & TCP_ACK != 0 {
        (tcp.ack_seq, 0, TCP_RST)
    } else {
        let occupied =
            segment_len + u32::from(tcp.flags & TCP_SYN != 0) + u32::from(tcp.flags & TCP_FIN != 0);
        (
            0,
            u32::from_be(tcp.seq).wrapping_add(occupied).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    let mut reply_ip = reply_ip_header(pkt, IPPROTO_TCP, TCP_HLEN);
    let mut reply_tcp = TcpHeader {
        sport: pkt.dport,
        dport: pkt.sport,
        seq,
        ack_seq,
        data_offset: ((TCP_HLEN / 4) as u8) << 4,
        flags,
        window: 0,
        check: 0,
        urg_ptr: 0,
    };
    let pseudo = PseudoHeader {
        saddr: reply_ip.saddr,
        daddr: reply_ip.daddr,
        zero: 0,
        proto: IPPROTO_TCP,
        len: (TCP_HLEN as u16).to_be(),
    };
    reply_tcp.check = fold(csum(&reply_tcp, csum(&pseudo, 0)?)?);
    reply_ip.check = fold(csum(&reply_ip, 0)?);
    resize(ctx, ETH_HLEN + IP_HLEN + TCP_HLEN)?;
    ctx.store(ETH_HLEN, &reply_ip, 0).map_err(|_| Broken)?;
    ctx.store(ETH_HLEN + IP_HLEN, &reply_tcp, 0)
        .map_err(|_| Broken)
}

/// Replaces the datagram by an ICMP port unreachable that quotes its IP and UDP headers, which
/// is how the client's kernel finds the socket to fail (ECONNREFUSED).
fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), Broken> {
    let mut icmp = IcmpQuoted {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        check: 0,
        unused: 0,
        quote: ctx.load(ETH_HLEN).map_err(|_| Broken)?,
    };
    icmp.check = fold(csum(&icmp, 0)?);
    let mut reply_ip = reply_ip_header(pkt, IPPROTO_ICMP, ICMP_HLEN + ICMP_QUOTE_LEN);
    reply_ip.check = fold(csum(&reply_ip, 0)?);
    resize(ctx, ETH_HLEN + IP_HLEN + ICMP_HLEN + ICMP_QUOTE_LEN)?;
    ctx.store(ETH_HLEN, &reply_ip, 0).map_err(|_| Broken)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0).map_err(|_| Broken)
}

/// The answer comes from the frontend the client addressed.
fn reply_ip_header(pkt: &Packet, proto: u8, payload_len: usize) -> Ipv4Header {
    const DONT_FRAGMENT: u16 = 0x4000;
    Ipv4Header {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((IP_HLEN + payload_len) as u16).to_be(),
        id: 0,
        frag_off: DONT_FRAGMENT.to_be(),
        ttl: 64,
        proto,
        check: 0,
        saddr: pkt.daddr,
        daddr: pkt.saddr,
    }
}

fn resize(ctx: &TcContext, len: usize) -> Result<(), Broken> {
    // SAFETY: helper call on the program's own skb.
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } {
        0 => Ok(()),
        _ => Err(Broken),
    }
}

/// The ones'-complement sum of `value`'s bytes (a multiple of 4 long) added to `seed`.
fn csum<T>(value: &T, seed: u32) -> Result<u32, Broken> {
    let size = core::mem::size_of::<T>() as __u32;
    // SAFETY: `value` is initialised stack memory of `size` bytes; the helper only reads it.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            value as *const T as *mut __u32,
            size,
            seed,
        )
    };
    if sum < 0 { Err(Broken) } else { Ok(sum as u32) }
}

/// Folds a 32-bit ones'-complement sum to the 16-bit checksum field value.
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
