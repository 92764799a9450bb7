//! The service datapath: one TC ingress program on every device of the node.
//!
//! A packet goes through these steps, each a function below, top to bottom:
//!
//! ```text
//! parse -> revnat_if_reply -----------------------------------------------------> forward
//!       -> lookup_service -> ct_lookup -> select_backend (affinity | random)
//!       -> ct_create -> dnat (+ hairpin snat) -> forward (FIB lookup, redirect to the egress device)
//!                   \-> refuse (TCP RST / ICMP port unreachable) when the frontend has no backend
//! ```
//!
//! Every packet addressed to a frontend is counted in its backend set's per-CPU `STATS` entry
//! (packets, bytes, new flows, refusals, affinity hits): one more lookup per packet.
//!
//! Per packet the work is a constant number of map lookups, whatever the number of Services or
//! backends: no loop ever walks a backend or frontend list.
//!
//! Replies are recognised by their own conntrack entry (keyed by the tuple the backend sends), so
//! the reverse translation needs no knowledge of which device the reply came in on. Whatever the
//! program does not recognise it passes untouched (`TC_ACT_OK`): it must never break traffic
//! that is not addressed to a Service.
#![no_std]
#![no_main]

mod forward;
mod maps;
mod packet;
mod refuse;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CT_F_CLOSING, CT_F_HAIRPIN, CT_FORWARD, CT_REPLY,
    CT_TIMEOUT_CLOSING_NS, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, CtKey, CtValue, IPPROTO_TCP,
    RevNat, SCOPE_INTERNAL, ServiceKey, ServiceStats, ServiceValue, SlotKey,
};

use crate::maps::{AFFINITY, BACKEND_SLOTS, BACKENDS, CONFIG, CONNTRACK, REVNAT, SERVICES, STATS};
use crate::packet::{Packet, TCP_FIN, TCP_RST};

/// "Not decided here" (TCX_NEXT): the packet goes on to the device's next program or tc filter,
/// then up the stack. Translated packets too: a CNI's or a shaper's filters must still see them.
const PASS: i32 = TC_ACT_UNSPEC;

/// A helper failed half-way through a rewrite: the packet may be inconsistent, so drop it.
struct Broken;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    match process(&ctx) {
        Ok(verdict) => verdict,
        Err(Broken) => TC_ACT_SHOT,
    }
}

fn process(ctx: &TcContext) -> Result<i32, Broken> {
    let Some(pkt) = packet::parse(ctx) else {
        return Ok(PASS);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if revnat_if_reply(ctx, &pkt, now)? {
        return forward::forward(ctx, &pkt);
    }
    let Some(service) = lookup_service(&pkt) else {
        return Ok(PASS);
    };
    let stats = Counting::start(&service, ctx.len());
    let flow = match ct_lookup(&pkt, &service, now) {
        Lookup::Established(flow) => flow,
        Lookup::New { replace } => {
            if service.backend_count == 0 {
                stats.count(|s| s.refused += 1);
                return refuse::refuse(ctx, &pkt);
            }
            let Some((backend_id, backend, remembered)) = select_backend(&service, &pkt, now)
            else {
                // The slot table disagrees with the frontend (never left so by the agent's
                // write order): refusing is the honest answer, like a frontend with no backend.
                stats.count(|s| s.refused += 1);
                return refuse::refuse(ctx, &pkt);
            };
            stats.count(|s| {
                s.flows += 1;
                s.affinity_hits += u64::from(remembered);
            });
            ct_create(&pkt, &service, backend_id, &backend, now, replace)
        }
    };
    dnat(ctx, &pkt, &flow)?;
    forward::forward(ctx, &pkt)
}

/// The calling CPU's `STATS` entry of a packet's backend set. The agent creates the entry with the
/// set, so a missing one (a set an old agent made before counters existed, until the next full
/// sync) only means this packet is not counted.
struct Counting(Option<*mut ServiceStats>);

impl Counting {
    /// Looks the entry up and counts the packet and its `len` bytes.
    fn start(service: &ServiceValue, len: u32) -> Counting {
        let counting = Counting(STATS.get_ptr_mut(service.svc_id));
        counting.count(|s| {
            s.packets += 1;
            s.bytes += u64::from(len);
        });
        counting
    }

    fn count(&self, update: impl FnOnce(&mut ServiceStats)) {
        if let Some(stats) = self.0 {
            // SAFETY: a pointer from a successful lookup into this CPU's copy of a per-CPU entry:
            // nothing else writes it while this program runs (programs do not migrate CPUs).
            update(unsafe { &mut *stats });
        }
    }
}

/// Where a flow goes: its backend, and whether its source is rewritten to the hairpin address.
struct Flow {
    backend_addr: u32,
    backend_port: u16,
    hairpin_addr: Option<u32>,
}

/// Whether an entry saw a packet recently enough for its state. A flow is alive while either
/// direction is: the other direction's entry is consulted before an idle one is given up.
fn fresh(entry: &CtValue, proto: u8, now: u64) -> bool {
    let timeout = if entry.flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_NS
    } else if proto == IPPROTO_TCP {
        CT_TIMEOUT_TCP_NS
    } else {
        CT_TIMEOUT_UDP_NS
    };
    now.wrapping_sub(entry.last_seen_ns) <= timeout
}

fn peer_fresh(key: &CtKey, now: u64) -> bool {
    // SAFETY: plain integers, copied out at once.
    unsafe { CONNTRACK.get(key) }.is_some_and(|peer| fresh(peer, key.proto, now))
}

/// A FIN or RST ends the connection for both directions: a new SYN on the tuple then picks a
/// backend afresh, and the entries expire after the short closing timeout.
fn mark_closing(key: &CtKey) {
    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a pointer from a successful lookup, written at once.
        unsafe { (*entry).flags |= CT_F_CLOSING };
    }
}

/// The forward key of the flow a reply entry belongs to.
fn forward_key_of(reply: &CtValue, frontend: &RevNat, proto: u8) -> CtKey {
    CtKey {
        saddr: reply.nat_addr,
        daddr: frontend.addr,
        sport: reply.nat_port,
        dport: frontend.port,
        proto,
        direction: CT_FORWARD,
        _pad: 0,
    }
}

/// The reply key of the flow a forward entry belongs to: what the backend sends, to the client
/// or, for a hairpin flow, to the hairpin address.
fn reply_key_of(
    pkt: &Packet,
    backend_addr: u32,
    backend_port: u16,
    hairpin_addr: Option<u32>,
) -> CtKey {
    CtKey {
        saddr: backend_addr,
        daddr: hairpin_addr.unwrap_or(pkt.saddr),
        sport: backend_port,
        dport: pkt.sport,
        proto: pkt.proto,
        direction: CT_REPLY,
        _pad: 0,
    }
}

/// A reply from a backend (it has a live reply conntrack entry): rewrite its source back to the
/// frontend the client used and, for a hairpin flow, its destination back to the client.
/// Returns whether the packet was a reply.
fn revnat_if_reply(ctx: &TcContext, pkt: &Packet, now: u64) -> Result<bool, Broken> {
    let key = pkt.ct_key(CT_REPLY);
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Ok(false);
    };
    // SAFETY: the pointer comes from a successful lookup; the value is plain integers, so a
    // concurrent update can at worst give a torn timestamp.
    let entry = unsafe { &mut *entry };
    // SAFETY: as above.
    let Some(frontend) = (unsafe { REVNAT.get(entry.revnat_id) }).copied() else {
        // The Service is gone: there is nothing to translate the reply back to.
        return Ok(false);
    };
    let forward = forward_key_of(entry, &frontend, pkt.proto);
    if !fresh(entry, pkt.proto, now) && !peer_fresh(&forward, now) {
        // A long-dead flow's tuple, reused by a connection that is not the Service's.
        return Ok(false);
    }
    entry.last_seen_ns = now;
    if pkt.has_tcp_flag(TCP_FIN | TCP_RST) {
        entry.flags |= CT_F_CLOSING;
        mark_closing(&forward);
    }
    let (client_addr, client_port) = (entry.nat_addr, entry.nat_port);
    let hairpin = entry.flags & CT_F_HAIRPIN != 0;
    packet::rewrite_source(ctx, pkt, frontend.addr, frontend.port)?;
    if hairpin {
        packet::rewrite_destination(ctx, pkt, client_addr, client_port)?;
    }
    Ok(true)
}

fn lookup_service(pkt: &Packet) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_INTERNAL,
    };
    // SAFETY: plain integers, copied out at once.
    unsafe { SERVICES.get(key) }.copied()
}

/// The backend `id` still is `addr:port` in this backend set. Conntrack and affinity entries
/// outlive agents and sets; an id that changed hands must not be followed.
fn backend_still(id: u32, service: &ServiceValue) -> Option<Backend> {
    // SAFETY: plain integers, copied out at once.
    unsafe { BACKENDS.get(id) }
        .copied()
        .filter(|backend| backend.svc_id == service.svc_id)
}

enum Lookup {
    Established(Flow),
    /// Choose a backend. `replace`: a stale entry holds the tuple and is overwritten.
    New {
        replace: bool,
    },
}

/// An established flow, or why the packet starts a new one:
/// - no entry, or one idle past its timeout in both directions;
/// - a TCP SYN on a tuple whose connection was closed (the client reuses its port);
/// - a TCP SYN or any UDP packet whose backend left the set (UDP has no connection to keep, and
///   kube-proxy clears UDP conntrack of removed endpoints too). Established TCP to a removed
///   backend keeps going, so a terminating pod can finish its connections.
fn ct_lookup(pkt: &Packet, service: &ServiceValue, now: u64) -> Lookup {
    let key = pkt.ct_key(CT_FORWARD);
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else {
        return Lookup::New { replace: false };
    };
    // SAFETY: as in revnat_if_reply.
    let entry = unsafe { &mut *entry };
    let hairpin_addr = if entry.flags & CT_F_HAIRPIN != 0 {
        configured_hairpin_addr()
    } else {
        None
    };
    let reply = reply_key_of(pkt, entry.nat_addr, entry.nat_port, hairpin_addr);
    let new_connection = pkt.is_tcp_syn();
    let stale = (!fresh(entry, pkt.proto, now) && !peer_fresh(&reply, now))
        || (new_connection && entry.flags & CT_F_CLOSING != 0)
        || ((new_connection || pkt.proto != IPPROTO_TCP)
            && backend_still(entry.backend_id, service)
                .is_none_or(|b| (b.addr, b.port) != (entry.nat_addr, entry.nat_port)));
    if stale {
        return Lookup::New { replace: true };
    }
    entry.last_seen_ns = now;
    if pkt.has_tcp_flag(TCP_FIN | TCP_RST) {
        entry.flags |= CT_F_CLOSING;
        mark_closing(&reply);
    }
    Lookup::Established(Flow {
        backend_addr: entry.nat_addr,
        backend_port: entry.nat_port,
        hairpin_addr,
    })
}

/// Picks the backend of a new flow: the client's affinity backend while it is fresh and still in
/// the set, otherwise a uniformly random slot of the current generation. The flag says which
/// (`true`: the remembered backend).
fn select_backend(service: &ServiceValue, pkt: &Packet, now: u64) -> Option<(u32, Backend, bool)> {
    let affinity_key = AffinityKey {
        svc_id: service.svc_id,
        client_addr: pkt.saddr,
    };
    let affinity_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    if affinity_ns != 0
        && let Some(entry) = AFFINITY.get_ptr_mut(affinity_key)
    {
        // SAFETY: as in revnat_if_reply.
        let entry = unsafe { &mut *entry };
        if now.wrapping_sub(entry.last_used_ns) <= affinity_ns
            && let Some(backend) = backend_still(entry.backend_id, service)
        {
            entry.last_used_ns = now;
            return Some((entry.backend_id, backend, true));
        }
    }
    let slot = SlotKey {
        svc_id: service.svc_id,
        generation: service.generation,
        slot: unsafe { bpf_get_prandom_u32() } % service.backend_count,
    };
    // SAFETY: plain integers, copied out at once.
    let backend_id = unsafe { BACKEND_SLOTS.get(slot) }.copied()?;
    let backend = unsafe { BACKENDS.get(backend_id) }.copied()?;
    if affinity_ns != 0 {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        // An LRU map makes room by itself; a failed insert only costs stickiness.
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    Some((backend_id, backend, false))
}

/// Records both directions of a new flow. Two CPUs may see a flow's first packets at once (a
/// multi-threaded UDP client): the forward entry is created only if absent, and a CPU that loses
/// the race follows the winner's choice, so one flow never reaches two backends.
fn ct_create(
    pkt: &Packet,
    service: &ServiceValue,
    backend_id: u32,
    backend: &Backend,
    now: u64,
    replace: bool,
) -> Flow {
    let forward_key = pkt.ct_key(CT_FORWARD);
    let hairpin_addr = if backend.addr == pkt.saddr {
        configured_hairpin_addr()
    } else {
        None
    };
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: if hairpin_addr.is_some() {
            CT_F_HAIRPIN
        } else {
            0
        },
        backend_id,
        revnat_id: service.revnat_id,
        last_seen_ns: now,
    };
    let flags = if replace { 0 } else { u64::from(BPF_NOEXIST) };
    if CONNTRACK.insert(forward_key, forward, flags).is_err()
        && let Some(winner) = unsafe { CONNTRACK.get(forward_key) }.copied()
    {
        let hairpin_addr = if winner.flags & CT_F_HAIRPIN != 0 {
            configured_hairpin_addr()
        } else {
            None
        };
        return Flow {
            backend_addr: winner.nat_addr,
            backend_port: winner.nat_port,
            hairpin_addr,
        };
    }
    let reply = CtValue {
        nat_addr: pkt.saddr,
        nat_port: pkt.sport,
        ..forward
    };
    // Conntrack is an LRU map: inserts evict the oldest flows instead of failing. Should one fail
    // anyway, this packet is still translated and the next one selects again.
    let _ = CONNTRACK.insert(
        reply_key_of(pkt, backend.addr, backend.port, hairpin_addr),
        reply,
        0,
    );
    Flow {
        backend_addr: backend.addr,
        backend_port: backend.port,
        hairpin_addr,
    }
}

fn configured_hairpin_addr() -> Option<u32> {
    CONFIG
        .get(0)
        .map(|config| config.hairpin_addr)
        .filter(|addr| *addr != 0)
}

/// Sends the packet to its backend: destination rewritten, and for a hairpin flow the source
/// too, so the pod never receives a packet from its own address.
fn dnat(ctx: &TcContext, pkt: &Packet, flow: &Flow) -> Result<(), Broken> {
    packet::rewrite_destination(ctx, pkt, flow.backend_addr, flow.backend_port)?;
    if let Some(addr) = flow.hairpin_addr {
        packet::rewrite_source(ctx, pkt, addr, pkt.sport)?;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
