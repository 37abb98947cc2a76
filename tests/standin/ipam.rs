//! Pod IP allocation from the pod CIDR. Addresses are handed out round-robin rather than
//! lowest-free, so an address released by a deleted pod is not reused at once while the
//! EndpointSlice controller (or a client) may still hold it. Pure code.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone)]
pub struct Ipam {
    net: Ipv4Net,
    gateway: Ipv4Addr,
    used: BTreeSet<Ipv4Addr>,
    /// Where the next search starts (an offset into the network).
    cursor: u32,
}

impl Ipam {
    /// `gateway` (the bridge's address, the node IP) is never handed out, nor the network
    /// and broadcast addresses.
    pub fn new(net: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            net: net.trunc(),
            gateway,
            used: BTreeSet::new(),
            cursor: 0,
        }
    }

    fn size(&self) -> u32 {
        1u32.checked_shl(32 - u32::from(self.net.prefix_len()))
            .unwrap_or(u32::MAX)
    }

    /// The next free address, or `None` when the range is exhausted.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let size = self.size();
        let base = u32::from(self.net.network());
        for step in 0..size {
            let offset = (self.cursor + step) % size;
            let ip = Ipv4Addr::from(base.wrapping_add(offset));
            if ip == self.net.network()
                || ip == self.net.broadcast()
                || ip == self.gateway
                || self.used.contains(&ip)
            {
                continue;
            }
            self.used.insert(ip);
            self.cursor = (offset + 1) % size;
            return Some(ip);
        }
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    pub fn prefix_len(&self) -> u8 {
        self.net.prefix_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(cidr: &str, gw: &str) -> Ipam {
        Ipam::new(cidr.parse().unwrap(), gw.parse().unwrap())
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let mut a = ipam("10.244.0.0/16", "10.244.0.1");
        assert_eq!(a.allocate(), Some("10.244.0.2".parse().unwrap()));
        assert_eq!(a.allocate(), Some("10.244.0.3".parse().unwrap()));
    }

    #[test]
    fn released_addresses_are_reused_only_after_the_rest() {
        let mut a = ipam("10.0.0.0/29", "10.0.0.1");
        let all: Vec<_> = std::iter::from_fn(|| a.allocate()).collect();
        assert_eq!(
            all.len(),
            5,
            "8 addresses minus network, broadcast, gateway"
        );
        assert_eq!(all[0], "10.0.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(all[4], "10.0.0.6".parse::<Ipv4Addr>().unwrap());
        a.release(all[1]);
        a.release(all[3]);
        assert_eq!(a.allocate(), Some(all[1]));
        assert_eq!(a.allocate(), Some(all[3]));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn round_robin_does_not_reuse_the_last_released_address_first() {
        let mut a = ipam("10.244.0.0/16", "10.244.0.1");
        let first = a.allocate().unwrap();
        a.release(first);
        let second = a.allocate().unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn host_bits_in_the_cidr_are_ignored() {
        let mut a = ipam("10.244.3.7/24", "10.244.3.1");
        assert_eq!(a.allocate(), Some("10.244.3.2".parse().unwrap()));
        assert_eq!(a.prefix_len(), 24);
    }
}
