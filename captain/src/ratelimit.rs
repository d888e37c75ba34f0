//! A fixed-window rate limit per client address (the public routes that
//! write: the waitlist). In memory, per captain: enough to stop one client
//! from filling a table; a cluster of captains allows that many per
//! captain.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimit {
    window: Duration,
    per_window: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimit {
    pub fn new(per_window: u32, window: Duration) -> RateLimit {
        RateLimit {
            window,
            per_window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Count a request of `ip`: `Err(wait)` when it is over the limit.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut seen = self.seen.lock().expect("rate limit");
        if seen.len() > 100_000 {
            let window = self.window;
            seen.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        // IPv6 clients are counted by their /64 (one host often has many).
        let key = match ip {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        };
        let e = seen.entry(key).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        if e.1 >= self.per_window {
            return Err(self.window.saturating_sub(now.duration_since(e.0)));
        }
        e.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_client_and_window() {
        let r = RateLimit::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(a, t0).is_ok());
        }
        assert!(r.check(a, t0).is_err(), "the fourth in the window");
        assert!(r.check(b, t0).is_ok(), "another client");
        let v6a: IpAddr = "fd00::1".parse().unwrap();
        let v6b: IpAddr = "fd00::2".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(v6a, t0).is_ok());
        }
        assert!(r.check(v6b, t0).is_err(), "the same /64");
        assert!(
            r.check(a, t0 + Duration::from_secs(61)).is_ok(),
            "a new window"
        );
    }
}
