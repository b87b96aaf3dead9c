//! Caps on what outsiders can open: SSE streams and WebSockets in all, and per client address.
//! A refused connection gets a 503 (or 429 for one address) with a JSON error, and is counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Which kind of long-lived connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /events`
    Sse,
    /// `GET /ws`
    Ws,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The total for this kind is reached.
    Total(usize),
    /// This address has too many open.
    PerAddress(usize),
}

/// Connection counters with their limits.
#[derive(Debug)]
pub struct Limits {
    max_sse: usize,
    max_ws: usize,
    max_per_ip: usize,
    sse: AtomicUsize,
    ws: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Held while a connection is open; releases its slots on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    kind: Kind,
    ip: Option<IpAddr>,
}

impl Limits {
    /// Limits for SSE streams, WebSockets, and streams of both kinds per address.
    pub fn new(max_sse: usize, max_ws: usize, max_per_ip: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_sse,
            max_ws,
            max_per_ip,
            sse: AtomicUsize::new(0),
            ws: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    fn counter(&self, kind: Kind) -> (&AtomicUsize, usize) {
        match kind {
            Kind::Sse => (&self.sse, self.max_sse),
            Kind::Ws => (&self.ws, self.max_ws),
        }
    }

    /// Takes a slot for a new connection from `ip`, or says which limit refused it.
    pub fn acquire(self: &Arc<Self>, kind: Kind, ip: Option<IpAddr>) -> Result<Slot, Refused> {
        let (counter, max) = self.counter(kind);
        if counter.fetch_add(1, Ordering::AcqRel) >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total(max));
        }
        if let Some(ip) = ip {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(map);
                counter.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::PerAddress(self.max_per_ip));
            }
            *n += 1;
        }
        Ok(Slot {
            limits: self.clone(),
            kind,
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (counter, _) = self.limits.counter(self.kind);
        counter.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut map = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_all_and_per_address_and_released_on_drop() {
        let l = Limits::new(2, 1, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = l.acquire(Kind::Sse, Some(a)).unwrap();
        assert_eq!(
            l.acquire(Kind::Sse, Some(a)).unwrap_err(),
            Refused::PerAddress(1)
        );
        let _s2 = l.acquire(Kind::Sse, Some(b)).unwrap();
        assert_eq!(l.acquire(Kind::Sse, None).unwrap_err(), Refused::Total(2));
        drop(s1);
        assert!(l.acquire(Kind::Sse, Some(a)).is_ok());
        assert!(l.acquire(Kind::Ws, None).is_ok());
    }
}
