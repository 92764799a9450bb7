//! `proxy-agent list [services|conntrack|affinity] [--json]`: what the pinned maps hold, read
//! from the pins (the agent need not run), in the spirit of `cilium bpf lb list` and
//! `cilium bpf ct list`. Each view is a list of rows: `--json` prints them as they are, the text
//! form is rendered from the same rows.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    AffinityKey, AffinityValue, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, CT_F_CLOSING, CT_F_HAIRPIN,
    CT_FORWARD, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP, ipv4_addr, map_names, port_host,
};
use serde::Serialize;

use crate::dataplane::maps::open;
use crate::dataplane::plan::MapState;

#[derive(Debug, PartialEq, Serialize)]
pub struct FrontendRow {
    pub frontend: String,
    pub protocol: &'static str,
    pub affinity_timeout_s: u32,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct BackendRow {
    /// `None`: the slot is missing (a state no sync leaves behind).
    pub address: Option<String>,
    pub id: u32,
    pub local: bool,
    pub terminating: bool,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct FlowRow {
    /// "forward" (client to frontend) or "reply" (backend to client).
    pub direction: &'static str,
    pub protocol: &'static str,
    pub source: String,
    pub destination: String,
    /// Forward: the backend; reply: the client it goes back to.
    pub nat: String,
    pub backend_id: u32,
    pub revnat_id: u32,
    pub hairpin: bool,
    pub closing: bool,
    pub idle_s: u64,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct AffinityRow {
    pub svc_id: u32,
    pub client: String,
    pub backend_id: u32,
    pub idle_s: u64,
}

fn protocol(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

fn endpoint(addr: u32, port: u16) -> String {
    format!("{}:{}", ipv4_addr(addr), port_host(port))
}

/// Every frontend with its current generation's backends, in slot order.
pub fn frontends(state: &MapState) -> Vec<FrontendRow> {
    let rows = state.services().iter().map(|(key, value)| {
        let backends = (0..value.backend_count).map(|slot| {
            let key = proxy_common::SlotKey {
                svc_id: value.svc_id,
                generation: value.generation,
                slot,
            };
            let id = state.slots().get(&key).copied();
            let backend = id.and_then(|id| state.backends().get(&id));
            BackendRow {
                address: backend.map(|b| endpoint(b.addr, b.port)),
                id: id.unwrap_or(0),
                local: backend.is_some_and(|b| b.flags & BACKEND_F_LOCAL != 0),
                terminating: backend.is_some_and(|b| b.flags & BACKEND_F_TERMINATING != 0),
            }
        });
        FrontendRow {
            frontend: endpoint(key.addr, key.port),
            protocol: protocol(key.proto),
            affinity_timeout_s: value.affinity_timeout_s,
            backends: backends.collect(),
        }
    });
    rows.collect()
}

/// One line per frontend, then one indented line per backend.
pub fn render(rows: &[FrontendRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:<6} BACKENDS", "FRONTEND", "PROTO");
    for row in rows {
        let mut notes = Vec::new();
        if row.affinity_timeout_s != 0 {
            notes.push(format!("affinity ClientIP {}s", row.affinity_timeout_s));
        }
        if row.backends.is_empty() {
            notes.push("no backends: refused".to_string());
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("({})", notes.join(", "))
        };
        let line = format!("{:<24} {:<6} {notes}", row.frontend, row.protocol);
        let _ = writeln!(out, "{}", line.trim_end());
        for (slot, backend) in row.backends.iter().enumerate() {
            let line = match &backend.address {
                Some(address) => {
                    let flags = [
                        (backend.local, "local"),
                        (backend.terminating, "terminating"),
                    ];
                    let flags: Vec<&str> = flags
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, name)| *name)
                        .collect();
                    format!("{address:<21} id {} {}", backend.id, flags.join(" "))
                }
                None => format!("slot {slot} missing"),
            };
            let _ = writeln!(out, "{:<31} -> {}", "", line.trim_end());
        }
    }
    out
}

fn open_lru<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(Map::LruHashMap(open(dir, name)?))?)
}

/// Monotonic time as `bpf_ktime_get_ns` counts it, to turn timestamps into ages.
fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Every conntrack entry, forward ones first.
pub fn flows(dir: &Path) -> anyhow::Result<Vec<FlowRow>> {
    let now = now_ns();
    let map = open_lru::<CtKey, CtValue>(dir, map_names::CONNTRACK)?;
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.context("reading CONNTRACK")?;
        rows.push(FlowRow {
            direction: if key.direction == CT_FORWARD {
                "forward"
            } else {
                "reply"
            },
            protocol: protocol(key.proto),
            source: endpoint(key.saddr, key.sport),
            destination: endpoint(key.daddr, key.dport),
            nat: endpoint(value.nat_addr, value.nat_port),
            backend_id: value.backend_id,
            revnat_id: value.revnat_id,
            hairpin: value.flags & CT_F_HAIRPIN != 0,
            closing: value.flags & CT_F_CLOSING != 0,
            idle_s: now.saturating_sub(value.last_seen_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| {
        (a.direction, &a.source, &a.destination).cmp(&(b.direction, &b.source, &b.destination))
    });
    Ok(rows)
}

pub fn render_flows(rows: &[FlowRow]) -> String {
    let mut out = format!(
        "{:<8} {:<5} {:<21} {:<21} {:<21} {:>7} FLAGS\n",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "NAT", "IDLE"
    );
    for row in rows {
        let flags = [(row.hairpin, "hairpin"), (row.closing, "closing")];
        let flags: Vec<&str> = flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect();
        let line = format!(
            "{:<8} {:<5} {:<21} {:<21} {:<21} {:>6}s {}",
            row.direction,
            row.protocol,
            row.source,
            row.destination,
            row.nat,
            row.idle_s,
            flags.join(" ")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Every `sessionAffinity: ClientIP` entry.
pub fn affinities(dir: &Path) -> anyhow::Result<Vec<AffinityRow>> {
    let now = now_ns();
    let map = open_lru::<AffinityKey, AffinityValue>(dir, map_names::AFFINITY)?;
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.context("reading AFFINITY")?;
        rows.push(AffinityRow {
            svc_id: key.svc_id,
            client: ipv4_addr(key.client_addr).to_string(),
            backend_id: value.backend_id,
            idle_s: now.saturating_sub(value.last_used_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| (a.svc_id, &a.client).cmp(&(b.svc_id, &b.client)));
    Ok(rows)
}

pub fn render_affinities(rows: &[AffinityRow]) -> String {
    let mut out = format!(
        "{:<6} {:<15} {:>7} {:>7}\n",
        "SET", "CLIENT", "BACKEND", "IDLE"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{:<6} {:<15} {:>7} {:>6}s",
            row.svc_id, row.client, row.backend_id, row.idle_s
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::plan::MapWrite;
    use proxy_common::{Backend, ServiceKey, ServiceValue, SlotKey, ipv4, port};
    use std::net::Ipv4Addr;

    #[test]
    fn frontends_show_their_backends_and_refusals() {
        let mut state = MapState::default();
        let key = |last: u8| ServiceKey {
            addr: ipv4(Ipv4Addr::new(10, 96, 0, last)),
            port: port(80),
            proto: IPPROTO_TCP,
            scope: 0,
        };
        let value = |svc_id, backend_count, affinity_timeout_s| ServiceValue {
            svc_id,
            backend_count,
            generation: 1,
            affinity_timeout_s,
            revnat_id: svc_id,
            flags: 0,
        };
        state.apply(&MapWrite::PutService(key(10), value(1, 1, 10800)));
        state.apply(&MapWrite::PutService(key(13), value(2, 0, 0)));
        let slot = SlotKey {
            svc_id: 1,
            generation: 1,
            slot: 0,
        };
        state.apply(&MapWrite::PutSlot(slot, 7));
        state.apply(&MapWrite::PutBackend(
            7,
            Backend {
                addr: ipv4(Ipv4Addr::new(10, 244, 1, 11)),
                port: port(8080),
                flags: BACKEND_F_LOCAL,
                _pad: 0,
                svc_id: 1,
            },
        ));
        let out = render(&frontends(&state));
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            vec![
                "FRONTEND                 PROTO  BACKENDS",
                "10.96.0.10:80            TCP    (affinity ClientIP 10800s)",
                "                                -> 10.244.1.11:8080      id 7 local",
                "10.96.0.13:80            TCP    (no backends: refused)",
            ]
        );
    }
}
