//! Automatic addresses, pure and deterministic: the next free host address of a network, in node
//! order, skipping the network and broadcast addresses, the gateway, the VIP and every address the
//! lab file fixes explicitly. The same file always gives the same addresses, and appending a node
//! never moves the addresses of the nodes before it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// Why an address cannot be used as a node's static address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    OutsideNetwork,
    NetworkAddress,
    Broadcast,
}

/// Host addresses of `net` (network and broadcast excluded; /31 and /32 have none).
pub fn host_range(net: Ipv4Network) -> Option<(u32, u32)> {
    if net.prefix() > 30 {
        return None;
    }
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()) - 1;
    Some((first, last))
}

/// Number of usable host addresses.
pub fn host_count(net: Ipv4Network) -> u64 {
    host_range(net).map_or(0, |(a, b)| u64::from(b - a) + 1)
}

/// First host address (the default gateway of nat/isolated networks).
pub fn first_host(net: Ipv4Network) -> Option<Ipv4Addr> {
    host_range(net).map(|(a, _)| Ipv4Addr::from(a))
}

/// Whether `ip` may be given to a NIC on `net` (gateway, VIP and duplicates are checked by callers,
/// which know what the address collides with).
pub fn check_host(net: Ipv4Network, ip: Ipv4Addr) -> Result<(), Unusable> {
    if !net.contains(ip) {
        Err(Unusable::OutsideNetwork)
    } else if ip == net.network() && net.prefix() < 31 {
        Err(Unusable::NetworkAddress)
    } else if ip == net.broadcast() && net.prefix() < 31 {
        Err(Unusable::Broadcast)
    } else {
        Ok(())
    }
}

/// The free addresses of one network, handed out lowest first.
#[derive(Debug, Clone)]
pub struct Pool {
    range: Option<(u32, u32)>,
    next: u32,
    reserved: BTreeSet<Ipv4Addr>,
}

impl Pool {
    /// `reserved`: gateway, VIP, explicit addresses — anything that must never be allocated.
    pub fn new(net: Ipv4Network, reserved: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        let range = host_range(net);
        Self {
            range,
            next: range.map_or(0, |(a, _)| a),
            reserved: reserved.into_iter().collect(),
        }
    }

    /// The next free address, or `None` when the network is exhausted.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let (_, last) = self.range?;
        while self.next <= last {
            let ip = Ipv4Addr::from(self.next);
            // `next` may pass `last` = u32::MAX - 1 at most, so this cannot overflow.
            self.next += 1;
            if self.reserved.insert(ip) {
                return Some(ip);
            }
        }
        None
    }
}

/// One NIC's address request: fixed, or `None` for automatic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Index into the networks slice given to [`assign`].
    pub network: usize,
    pub fixed: Option<Ipv4Addr>,
}

/// Addresses for `requests` (node order, NIC order) on `networks` (cidr, addresses never to hand
/// out — gateway, VIP). Fixed addresses are kept as they are; automatic ones get the next free
/// address, or `None` when the network is exhausted.
pub fn assign(
    networks: &[(Ipv4Network, Vec<Ipv4Addr>)],
    requests: &[Request],
) -> Vec<Option<Ipv4Addr>> {
    let mut pools: Vec<Pool> = networks
        .iter()
        .enumerate()
        .map(|(i, (net, reserved))| {
            let fixed = requests
                .iter()
                .filter(|r| r.network == i)
                .filter_map(|r| r.fixed);
            Pool::new(*net, reserved.iter().copied().chain(fixed))
        })
        .collect();
    requests
        .iter()
        .map(|r| match r.fixed {
            Some(ip) => Some(ip),
            None => pools.get_mut(r.network).and_then(Pool::allocate),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges() {
        assert_eq!(host_count(net("10.0.0.0/24")), 254);
        assert_eq!(host_count(net("10.0.0.0/30")), 2);
        assert_eq!(host_count(net("10.0.0.0/31")), 0);
        assert_eq!(
            first_host(net("192.168.150.0/24")),
            Some(ip("192.168.150.1"))
        );
        assert_eq!(first_host(net("10.0.0.0/32")), None);
    }

    #[test]
    fn host_checks() {
        let n = net("10.10.1.0/24");
        assert_eq!(check_host(n, ip("10.10.1.10")), Ok(()));
        assert_eq!(
            check_host(n, ip("10.10.1.0")),
            Err(Unusable::NetworkAddress)
        );
        assert_eq!(check_host(n, ip("10.10.1.255")), Err(Unusable::Broadcast));
        assert_eq!(
            check_host(n, ip("10.10.2.1")),
            Err(Unusable::OutsideNetwork)
        );
    }

    #[test]
    fn pool_skips_reserved_and_exhausts() {
        let mut p = Pool::new(net("10.0.0.0/29"), [ip("10.0.0.1"), ip("10.0.0.3")]);
        let got: Vec<_> = std::iter::from_fn(|| p.allocate()).collect();
        assert_eq!(
            got,
            vec![
                ip("10.0.0.2"),
                ip("10.0.0.4"),
                ip("10.0.0.5"),
                ip("10.0.0.6")
            ]
        );
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn pool_at_top_of_address_space() {
        let mut p = Pool::new(net("255.255.255.252/30"), []);
        assert_eq!(p.allocate(), Some(ip("255.255.255.253")));
        assert_eq!(p.allocate(), Some(ip("255.255.255.254")));
        assert_eq!(p.allocate(), None);
    }

    #[test]
    fn assign_keeps_fixed_and_skips_them_deterministically() {
        let nets = vec![
            (net("10.0.0.0/24"), vec![ip("10.0.0.1")]),
            (net("10.0.1.0/24"), vec![ip("10.0.1.1"), ip("10.0.1.100")]),
        ];
        let reqs = [
            Request {
                network: 0,
                fixed: None,
            },
            Request {
                network: 1,
                fixed: Some(ip("10.0.1.3")),
            },
            Request {
                network: 0,
                fixed: Some(ip("10.0.0.2")),
            },
            Request {
                network: 1,
                fixed: None,
            },
            Request {
                network: 1,
                fixed: None,
            },
            Request {
                network: 1,
                fixed: None,
            },
        ];
        let a = assign(&nets, &reqs);
        assert_eq!(
            a,
            vec![
                Some(ip("10.0.0.3")),
                Some(ip("10.0.1.3")),
                Some(ip("10.0.0.2")),
                Some(ip("10.0.1.2")),
                Some(ip("10.0.1.4")),
                Some(ip("10.0.1.5")),
            ]
        );
        assert_eq!(assign(&nets, &reqs), a, "same input, same output");
        // Appending a request does not move earlier automatic addresses.
        let mut more = reqs.to_vec();
        more.push(Request {
            network: 0,
            fixed: None,
        });
        assert_eq!(&assign(&nets, &more)[..reqs.len()], &a[..]);
    }

    #[test]
    fn assign_reports_exhaustion() {
        let nets = vec![(net("10.0.0.0/30"), vec![ip("10.0.0.1")])];
        let reqs = [
            Request {
                network: 0,
                fixed: None,
            },
            Request {
                network: 0,
                fixed: None,
            },
        ];
        assert_eq!(assign(&nets, &reqs), vec![Some(ip("10.0.0.2")), None]);
    }
}
