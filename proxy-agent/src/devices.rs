//! Which devices of the node's network namespace carry the datapath, and noticing new ones.
//!
//! The program goes on the uplinks (`--devices`, or the device of the default route) and on
//! every veth: pods are reached through veths, and a pod created after the agent started must
//! be served from its first packet, so link events from netlink trigger a fresh look at once.
//! Only Ethernet devices: the program parses an Ethernet header, which L3 devices (WireGuard,
//! IP tunnels) do not have. The choice itself ([`select`]) is a pure function of the device list.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub index: u32,
    pub name: String,
    pub veth: bool,
    pub ethernet: bool,
}

/// How the uplinks are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uplinks {
    /// `--devices`: exactly these names.
    Named(Vec<String>),
    /// The device the default route leaves through, if there is one.
    DefaultRoute(Option<u32>),
}

/// The devices to attach to, by ifindex: the uplinks and every veth.
pub fn select(devices: &[Device], uplinks: &Uplinks) -> BTreeMap<u32, String> {
    devices
        .iter()
        .filter(|device| device.ethernet)
        .filter(|device| {
            device.veth
                || match uplinks {
                    Uplinks::Named(names) => names.contains(&device.name),
                    Uplinks::DefaultRoute(index) => *index == Some(device.index),
                }
        })
        .map(|device| (device.index, device.name.clone()))
        .collect()
}

/// Every link in the namespace.
pub async fn list(handle: &Handle) -> anyhow::Result<Vec<Device>> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing links")?;
    Ok(links.into_iter().filter_map(device).collect())
}

fn device(link: LinkMessage) -> Option<Device> {
    let mut name = None;
    let mut veth = false;
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    Some(Device {
        index: link.header.index,
        ethernet: link.header.link_layer_type == LinkLayerType::Ether,
        name: name?,
        veth,
    })
}

/// The ifindex the IPv4 default route of the main table leaves through (its first next hop, if
/// it is a multipath route).
pub async fn default_route_device(handle: &Handle) -> anyhow::Result<Option<u32>> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .context("listing routes")?;
    Ok(routes
        .into_iter()
        .filter(|route| route.header.destination_prefix_length == 0)
        .find_map(|route| {
            route
                .attributes
                .into_iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Oif(index) => Some(index),
                    RouteAttribute::MultiPath(hops) => hops.first().map(|hop| hop.interface_index),
                    _ => None,
                })
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, name: &str, veth: bool) -> Device {
        Device {
            index,
            name: name.into(),
            veth,
            ethernet: name != "wg0",
        }
    }

    #[test]
    fn uplinks_and_every_veth_are_selected() {
        let devices = [
            dev(1, "lo", false),
            dev(2, "eth0", false),
            dev(3, "eth1", false),
            dev(4, "cali1", true),
            dev(5, "wg0", false),
        ];
        let cases = [
            (
                "default route",
                Uplinks::DefaultRoute(Some(2)),
                vec![(2, "eth0"), (4, "cali1")],
            ),
            (
                "no default route",
                Uplinks::DefaultRoute(None),
                vec![(4, "cali1")],
            ),
            (
                "named",
                Uplinks::Named(vec!["eth1".into()]),
                vec![(3, "eth1"), (4, "cali1")],
            ),
            (
                "an L3 device is never served",
                Uplinks::Named(vec!["wg0".into()]),
                vec![(4, "cali1")],
            ),
            (
                "named twice",
                Uplinks::Named(vec!["eth0".into(), "eth1".into()]),
                vec![(2, "eth0"), (3, "eth1"), (4, "cali1")],
            ),
        ];
        for (case, uplinks, expected) in cases {
            let expected: BTreeMap<u32, String> = expected
                .into_iter()
                .map(|(i, n)| (i, n.to_string()))
                .collect();
            assert_eq!(select(&devices, &uplinks), expected, "{case}");
        }
    }
}
