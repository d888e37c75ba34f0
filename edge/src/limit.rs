//! What one client may hold: a client connection's permit counts against
//! the edge's total ([`crate::server::Limits::max_connections`]) and
//! against its address's share
//! ([`crate::server::Limits::max_connections_per_ip`]), so one address
//! cannot take every connection the edge will open.
//!
//! An IPv4 client is one address; an IPv6 client is its /64 (one host or
//! site is given a whole /64, and picking another address in it is free).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// The key a client is counted under: an IPv4 address (mapped into
/// IPv6), or an IPv6 /64 prefix.
pub fn client_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6) & !((1u128 << 64) - 1),
        },
    }
}

/// A client key as stored: two halves (a `u128` would double the
/// alignment, and so the size, of every parked connection's permit).
type Key = [u64; 2];

fn key_of(ip: IpAddr) -> Key {
    let k = client_key(ip);
    [(k >> 64) as u64, k as u64]
}

/// Open connections per client key.
#[derive(Debug)]
pub struct PerIp {
    max: usize,
    open: Mutex<HashMap<Key, u32>>,
}

impl PerIp {
    /// At most `max` connections per client; 0: no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// Counts a new connection from `ip`; `None` when that client has its
    /// share open already.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot(None));
        }
        let key = key_of(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n as usize >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((self.clone(), key))))
    }

    /// Connections open now from `ip`'s client key.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&key_of(ip)).map_or(0, |n| *n as usize)
    }

    fn release(&self, key: Key) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
                if open.capacity() > 1024 && open.len() < open.capacity() / 4 {
                    open.shrink_to_fit();
                }
            }
        }
    }
}

/// One connection counted against its client's share; given back on drop.
#[derive(Debug)]
pub struct IpSlot(Option<(Arc<PerIp>, Key)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((per_ip, key)) = self.0.take() {
            per_ip.release(key);
        }
    }
}

/// Everything a client connection holds while open (also while parked).
#[derive(Debug)]
pub struct ConnPermit {
    pub(crate) _total: OwnedSemaphorePermit,
    pub(crate) _ip: IpSlot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        // An IPv4 client is the same however it arrives.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), client_key(mapped));
        assert_ne!(client_key(v4), client_key("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn a_client_gets_its_share_and_no_more() {
        let per_ip = PerIp::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = per_ip.acquire(ip).unwrap();
        let _b = per_ip.acquire(ip).unwrap();
        assert!(per_ip.acquire(ip).is_none());
        let _c = per_ip.acquire(other).unwrap();
        drop(a);
        assert_eq!(per_ip.open(ip), 1);
        let _d = per_ip.acquire(ip).unwrap();
        assert!(PerIp::new(0).acquire(ip).is_some(), "0: no limit");
    }
}
