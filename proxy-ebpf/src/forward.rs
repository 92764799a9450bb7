//! The last step for a translated packet: send it straight to the device its new destination is
//! routed through, as the kernel's forwarding would, without going up the IP input path.
//!
//! Why not let the kernel route it: the address was rewritten before routing, so the kernel's
//! checks see the new address on the old device. A reply from a local pod carries the Service
//! address as its source, whose route is the uplink, and reverse-path filtering drops it (an
//! address-less pod veth fails even loose mode). It is also the cheaper path.
//!
//! Like the kernel's forwarding: TTL decremented (a packet that would expire goes to the kernel,
//! which sends the ICMP time exceeded), MACs from the FIB and the neighbour table. Whatever the
//! FIB cannot answer (forwarding off, no route, a local destination, a packet too big for the
//! egress MTU) goes to the kernel unchanged, which does the right thing or says why.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::packet::{ETH_HLEN, IP_CHECK, IP_DADDR, IP_SADDR, Packet};
use crate::{Broken, PASS};

const AF_INET: u8 = 2;
const IP_TOS: usize = ETH_HLEN + 1;
const IP_TTL: usize = ETH_HLEN + 8;

pub fn forward(ctx: &TcContext, pkt: &Packet) -> Result<i32, Broken> {
    let ttl: u8 = ctx.load(IP_TTL).map_err(|_| Broken)?;
    if ttl <= 1 {
        return Ok(PASS);
    }
    // SAFETY: an all-zero bpf_fib_lookup is its documented "no options" state.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    // SAFETY: the program's own skb.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_2.tos = ctx.load(IP_TOS).map_err(|_| Broken)?;
    // The addresses as they are now, after translation.
    fib.__bindgen_anon_3.ipv4_src = ctx.load(IP_SADDR).map_err(|_| Broken)?;
    fib.__bindgen_anon_4.ipv4_dst = ctx.load(IP_DADDR).map_err(|_| Broken)?;
    let size = core::mem::size_of::<FibLookup>() as i32;
    // SAFETY: `fib` is initialised stack memory of `size` bytes.
    let result = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &mut fib, size, 0) } as u32;
    if result != BPF_FIB_LKUP_RET_SUCCESS && result != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Ok(PASS);
    }
    decrement_ttl(ctx, ttl)?;
    if result == BPF_FIB_LKUP_RET_SUCCESS {
        ctx.store(0, &fib.dmac, 0).map_err(|_| Broken)?;
        ctx.store(6, &fib.smac, 0).map_err(|_| Broken)?;
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32);
    }
    // The next hop has no neighbour entry yet: let the kernel resolve it and send.
    let mut next_hop = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            // SAFETY: on NO_NEIGH the FIB leaves the next hop's address in ipv4_dst.
            ipv4_nh: unsafe { fib.__bindgen_anon_4.ipv4_dst },
        },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    // SAFETY: `next_hop` is initialised stack memory of `size` bytes.
    Ok(unsafe { bpf_redirect_neigh(fib.ifindex, &mut next_hop, size, 0) } as i32)
}

/// TTL and protocol share a 16-bit word of the header checksum.
fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), Broken> {
    let proto: u8 = ctx.load(IP_TTL + 1).map_err(|_| Broken)?;
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.store(IP_TTL, &(ttl - 1), 0).map_err(|_| Broken)?;
    ctx.l3_csum_replace(IP_CHECK, u64::from(old), u64::from(new), 2)
        .map_err(|_| Broken)
}
