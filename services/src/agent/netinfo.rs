//! The guest's network addresses, for KVP's auto pool and `GET_IP_INFO`: interfaces and
//! their addresses from `getifaddrs`, IPv4 gateways from `/proc/net/route`, name servers
//! from `/etc/resolv.conf`. Lists are joined with `;`, as Linux's KVP daemon joins them.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};

use nix::ifaddrs::getifaddrs;

/// One network interface and its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its MAC address, upper case with colons (`00:15:5D:01:02:03`), if it has one.
    pub mac: Option<String>,
    /// IPv4 addresses with their netmasks.
    pub ipv4: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// IPv6 addresses with their prefix lengths.
    pub ipv6: Vec<(std::net::Ipv6Addr, u8)>,
}

impl Interface {
    /// `a;b;...` of the addresses of one family (IPv4 when `v4`).
    pub fn addresses(&self, v4: bool) -> String {
        if v4 {
            join(self.ipv4.iter().map(|(a, _)| a.to_string()))
        } else {
            join(self.ipv6.iter().map(|(a, _)| a.to_string()))
        }
    }

    /// `m;n;...` of the netmasks (IPv4) or prefix lengths (IPv6).
    pub fn subnets(&self, v4: bool) -> String {
        if v4 {
            join(self.ipv4.iter().map(|(_, m)| m.to_string()))
        } else {
            join(self.ipv6.iter().map(|(_, p)| p.to_string()))
        }
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(";")
}

/// Every interface but loopback, by name.
pub fn interfaces() -> nix::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    for ifa in getifaddrs()? {
        if ifa.interface_name == "lo" {
            continue;
        }
        let i = match out.iter().position(|i| i.name == ifa.interface_name) {
            Some(i) => i,
            None => {
                out.push(Interface {
                    name: ifa.interface_name.clone(),
                    ..Interface::default()
                });
                out.len() - 1
            }
        };
        let iface = &mut out[i];
        let Some(addr) = ifa.address else { continue };
        if let Some(link) = addr.as_link_addr() {
            if let Some(mac) = link.addr().filter(|m| m.iter().any(|b| *b != 0)) {
                iface.mac = Some(
                    mac.iter()
                        .map(|b| format!("{b:02X}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
        } else if let Some(v4) = addr.as_sockaddr_in() {
            let mask = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| m.ip()))
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            iface.ipv4.push((v4.ip(), mask));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let prefix = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in6().map(|m| m.ip()))
                .map_or(0, |m| u128::from(m).count_ones() as u8);
            iface.ipv6.push((v6.ip(), prefix));
        }
    }
    Ok(out)
}

/// The interface whose MAC address is `mac` (any case, `:` or `-` separated).
pub fn by_mac(mac: &str) -> nix::Result<Option<Interface>> {
    let wanted = mac.replace('-', ":").to_ascii_uppercase();
    Ok(interfaces()?
        .into_iter()
        .find(|i| i.mac.as_deref() == Some(wanted.as_str())))
}

/// The IPv4 default gateways of interface `name`, from `/proc/net/route`.
pub fn ipv4_gateways(name: &str) -> Vec<Ipv4Addr> {
    fs::read_to_string("/proc/net/route")
        .map(|t| parse_routes(&t, name))
        .unwrap_or_default()
}

fn parse_routes(text: &str, name: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gw) = (f.first()?, f.get(1)?, f.get(2)?);
            if *iface != name || *dest != "00000000" {
                return None;
            }
            // The kernel prints the address as a host-order hex word.
            let gw = u32::from_str_radix(gw, 16).ok()?;
            (gw != 0).then(|| Ipv4Addr::from(gw.swap_bytes()))
        })
        .collect()
}

/// The name servers in `/etc/resolv.conf`.
pub fn name_servers() -> Vec<IpAddr> {
    fs::read_to_string("/etc/resolv.conf")
        .map(|t| parse_resolv(&t))
        .unwrap_or_default()
}

fn parse_resolv(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_give_the_default_gateway_of_the_interface() {
        let text = "Iface\tDestination\tGateway \tFlags\n\
                    eth0\t00000000\t0102A8C0\t0003\n\
                    eth0\t0002A8C0\t00000000\t0001\n\
                    eth1\t00000000\t0101A8C0\t0003\n";
        assert_eq!(parse_routes(text, "eth0"), [Ipv4Addr::new(192, 168, 2, 1)]);
        assert_eq!(parse_routes(text, "eth1"), [Ipv4Addr::new(192, 168, 1, 1)]);
        assert!(parse_routes(text, "eth2").is_empty());
        assert!(parse_routes("garbage\nx y\n", "x").is_empty());
    }

    #[test]
    fn resolv_conf_name_servers() {
        let text = "# comment\nnameserver 10.0.0.2\nsearch x\nnameserver ::1\nnameserver bogus\n";
        let got = parse_resolv(text);
        assert_eq!(
            got,
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn this_machine_has_interfaces_with_joined_addresses() {
        let all = interfaces().expect("getifaddrs");
        assert!(all.iter().all(|i| i.name != "lo"));
        for i in &all {
            assert_eq!(
                i.addresses(true)
                    .split(';')
                    .filter(|s| !s.is_empty())
                    .count(),
                i.ipv4.len()
            );
            if let Some(mac) = &i.mac {
                let found = by_mac(&mac.to_ascii_lowercase())
                    .expect("lookup")
                    .expect("found");
                assert_eq!(found.name, i.name);
            }
        }
    }
}
