//! Failed admin attempts, limited per client.
//!
//! A wrong admin token counts against the client that sent it; after
//! `WEB_ADMIN_MAX_FAILURES` wrong tokens within `WEB_ADMIN_LOCKOUT_SECS`, that
//! client's admin requests are refused with 429 and `Retry-After` for
//! `WEB_ADMIN_LOCKOUT_SECS`, whatever token they carry, so guessing stops there.
//! A right token clears the client's count.
//!
//! Who "a client" is depends on what stands in front of the pods:
//!
//! - the `LoadBalancer` Service (`externalTrafficPolicy: Local`, the base
//!   manifests): the TCP peer is the client's own address;
//! - Google's Application Load Balancer (the `gke-https` Gateway): the peer is a
//!   Google proxy, shared by everyone, and the client is the address the load
//!   balancer put into `X-Forwarded-For`: `<what the client sent>, <client>,
//!   <load balancer>`, second from the right (`WEB_FORWARDED_FOR_HOPS=2`).
//!
//! The header is read only when `WEB_FORWARDED_FOR_HOPS` says how many trusted
//! proxies append to it; anything a client writes there itself sits further
//! left and is never used. IPv6 clients are counted per /64, the smallest
//! network one subscriber usually holds. Counts live in each replica's memory
//! (bounded to [`MAX_CLIENTS`] entries): with R replicas a client gets at most R
//! times the limit before every replica has locked it out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most clients remembered at once; beyond it the entry that changed
/// longest ago is forgotten first.
pub const MAX_CLIENTS: usize = 10_000;

/// The key a client's failures are counted under: its address, or its /64.
pub fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client's address: the `hops`-th address from the right of
/// `X-Forwarded-For` (all its lines, in order) when `hops > 0` and the header
/// has that many well-formed entries, else the TCP peer.
pub fn client_address<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl Iterator<Item = &'a str>,
    hops: usize,
) -> Option<IpAddr> {
    if hops > 0 {
        let entries: Vec<&str> = forwarded_for.flat_map(|line| line.split(',')).map(str::trim).collect();
        if entries.len() >= hops
            && let Ok(addr) = entries[entries.len() - hops].parse::<IpAddr>()
        {
            return Some(addr);
        }
    }
    peer
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// When the current counting window started.
    since: Instant,
    locked_until: Option<Instant>,
}

/// What a wrong token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; this many more are allowed before the lockout.
    Counted { left: u32 },
    /// This failure locked the client out for the duration.
    LockedOut(Duration),
}

/// The failed-attempt counts of one replica.
#[derive(Debug)]
pub struct AdminLockout {
    max_failures: u32,
    period: Duration,
    clients: Mutex<HashMap<IpAddr, Entry>>,
}

impl AdminLockout {
    /// `max_failures` wrong tokens within `period` lock a client out for `period`.
    pub fn new(max_failures: u32, period: Duration) -> Self {
        Self { max_failures: max_failures.max(1), period, clients: Mutex::new(HashMap::new()) }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        // A panic while holding the lock cannot leave a map half-updated.
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(how long)` while `client` is locked out.
    ///
    /// # Errors
    /// The client is locked out; the remaining time is returned.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.clients().get(&client_key(client)).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts a wrong token from `client`.
    pub fn failed(&self, client: IpAddr, now: Instant) -> Failure {
        let mut clients = self.clients();
        let key = client_key(client);
        if !clients.contains_key(&key) && clients.len() >= MAX_CLIENTS {
            Self::make_room(&mut clients, now, self.period);
        }
        let entry = clients.entry(key).or_insert(Entry { failures: 0, since: now, locked_until: None });
        let expired = entry.locked_until.map_or(now.duration_since(entry.since) >= self.period, |until| until <= now);
        if expired {
            *entry = Entry { failures: 0, since: now, locked_until: None };
        }
        entry.failures += 1;
        if entry.failures >= self.max_failures {
            entry.locked_until = Some(now + self.period);
            Failure::LockedOut(self.period)
        } else {
            Failure::Counted { left: self.max_failures - entry.failures }
        }
    }

    /// A right token from `client`: its count starts again.
    pub fn succeeded(&self, client: IpAddr) {
        self.clients().remove(&client_key(client));
    }

    /// Clients locked out now.
    pub fn locked(&self, now: Instant) -> usize {
        self.clients().values().filter(|e| e.locked_until.is_some_and(|u| u > now)).count()
    }

    fn make_room(clients: &mut HashMap<IpAddr, Entry>, now: Instant, period: Duration) {
        clients.retain(|_, e| e.locked_until.map_or(now.duration_since(e.since) < period, |u| u > now));
        if clients.len() >= MAX_CLIENTS
            && let Some(oldest) = clients.iter().min_by_key(|(_, e)| e.since).map(|(k, _)| *k)
        {
            clients.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_is_locked_out_after_the_limit_and_others_are_not() {
        let lockout = AdminLockout::new(3, PERIOD);
        let t = Instant::now();
        assert_eq!(lockout.failed(ip("203.0.113.7"), t), Failure::Counted { left: 2 });
        assert_eq!(lockout.failed(ip("203.0.113.7"), t), Failure::Counted { left: 1 });
        assert!(lockout.check(ip("203.0.113.7"), t).is_ok());
        assert_eq!(lockout.failed(ip("203.0.113.7"), t), Failure::LockedOut(PERIOD));
        assert_eq!(lockout.check(ip("203.0.113.7"), t + Duration::from_secs(10)), Err(Duration::from_secs(50)));
        assert!(lockout.check(ip("203.0.113.8"), t).is_ok(), "another client is locked out too");
        assert_eq!(lockout.locked(t), 1);
        // The lockout ends after the period, and counting starts again.
        assert!(lockout.check(ip("203.0.113.7"), t + PERIOD).is_ok());
        assert_eq!(lockout.failed(ip("203.0.113.7"), t + PERIOD), Failure::Counted { left: 2 });
    }

    #[test]
    fn failures_outside_the_window_and_before_a_success_are_forgotten() {
        let lockout = AdminLockout::new(2, PERIOD);
        let t = Instant::now();
        lockout.failed(ip("198.51.100.1"), t);
        assert_eq!(lockout.failed(ip("198.51.100.1"), t + PERIOD), Failure::Counted { left: 1 });
        lockout.succeeded(ip("198.51.100.1"));
        assert_eq!(lockout.failed(ip("198.51.100.1"), t + PERIOD), Failure::Counted { left: 1 });
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let lockout = AdminLockout::new(2, PERIOD);
        let t = Instant::now();
        lockout.failed(ip("2001:db8:1:2::1"), t);
        assert_eq!(lockout.failed(ip("2001:db8:1:2:ffff::9"), t), Failure::LockedOut(PERIOD));
        assert!(lockout.check(ip("2001:db8:1:3::1"), t).is_ok());
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_clients() {
        let lockout = AdminLockout::new(5, PERIOD);
        let t = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 500) {
            lockout.failed(IpAddr::from(i.to_be_bytes()), t);
        }
        assert!(lockout.clients().len() <= MAX_CLIENTS);
    }

    #[test]
    fn the_forwarded_address_is_read_only_at_the_trusted_position() {
        let peer = Some(ip("35.191.0.10"));
        let header = ["1.2.3.4, 203.0.113.9", "34.120.0.1"];
        assert_eq!(client_address(peer, header.into_iter(), 2), Some(ip("203.0.113.9")));
        assert_eq!(client_address(peer, header.into_iter(), 1), Some(ip("34.120.0.1")));
        assert_eq!(client_address(peer, header.into_iter(), 0), peer, "the header was trusted without hops");
        assert_eq!(client_address(peer, ["203.0.113.9"].into_iter(), 2), peer, "too few entries");
        assert_eq!(client_address(peer, ["junk, 34.120.0.1"].into_iter(), 2), peer, "unparsable entry");
        assert_eq!(client_address(peer, std::iter::empty(), 2), peer);
    }
}
