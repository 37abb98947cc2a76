//! Replicas and the choice between them: power of two choices over requests in flight,
//! with `containerConcurrency` as a hard per-replica cap. A [`Lease`] is one request's
//! claim on a replica; dropping it gives the slot back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rand::Rng;

use super::pool::{IdleConns, RawConn};

/// One ready replica of a Function. Shared by every request sent to it and kept alive by
/// them after it leaves the ready set, so its in-flight count stays true while it drains.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(crate) addr: SocketAddr,
    in_flight: AtomicU64,
    /// How many Functions' ready sets list it (0: new requests never go to it).
    routed: AtomicU32,
    /// Keep-alive connections to it, for the requests `proxy` serves.
    pub(crate) idle: IdleConns,
    /// Keep-alive sockets to it, for the fast lane's exchanges (`lane`).
    pub(crate) raw: IdleConns<RawConn>,
}

impl Replica {
    /// A replica whose connections are used by `threads` data-plane threads.
    pub(crate) fn new(addr: SocketAddr, threads: usize) -> Arc<Self> {
        Arc::new(Self {
            addr,
            in_flight: AtomicU64::new(0),
            routed: AtomicU32::new(0),
            idle: IdleConns::new(threads),
            raw: IdleConns::new(threads),
        })
    }

    /// Requests in flight to it. Sequentially consistent with [`Self::set_routed`] and
    /// the check in [`Self::try_acquire`]: see there.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether some Function's ready set lists it.
    pub(crate) fn is_routed(&self) -> bool {
        self.routed.load(Ordering::SeqCst) > 0
    }

    /// Counts it into (`true`) or out of a ready set.
    pub(crate) fn set_routed(&self, routed: bool) {
        if routed {
            self.routed.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = self
                .routed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }

    /// Takes a slot unless the replica is at `cap` or no longer routed.
    ///
    /// A request picks from the snapshot of a ready set it loaded a moment before, so the
    /// replica may have left every ready set in between, and a drain may already have
    /// seen it unrouted with nothing in flight and let the pod stop. So the slot is taken
    /// first and the routing checked after, both sequentially consistent: a drain that
    /// reads 0 in flight after the replica was unrouted can no longer be followed by a
    /// request to it (seen once on v1.24: one 502 in a scale-down, 3 ms after the drain).
    fn try_acquire(self: &Arc<Self>, cap: Option<u32>) -> Option<Lease> {
        match cap {
            None => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
            }
            Some(cap) => {
                self.in_flight
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < u64::from(cap)).then_some(n + 1)
                    })
                    .ok()?;
            }
        }
        let lease = Lease {
            replica: self.clone(),
        };
        // Dropping the lease gives the slot back.
        self.is_routed().then_some(lease)
    }
}

/// One request's slot on a replica.
#[derive(Debug)]
pub(crate) struct Lease {
    replica: Arc<Replica>,
}

impl Lease {
    pub(crate) fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no replica was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoReplica {
    /// There are no replicas.
    Empty,
    /// Every replica is at its cap; one may free up.
    Busy,
    /// Every replica was already tried by this request.
    AllTried,
}

/// Picks the less loaded of two random replicas that this request has not tried and that
/// have room under `cap`; when both are full, the least loaded one that has room.
pub(crate) fn pick(
    replicas: &[Arc<Replica>],
    cap: Option<u32>,
    tried: &[SocketAddr],
) -> Result<Lease, NoReplica> {
    let eligible = |r: &Arc<Replica>| !tried.contains(&r.addr);
    match replicas.len() {
        0 => return Err(NoReplica::Empty),
        1 => {
            let r = &replicas[0];
            if !eligible(r) {
                return Err(NoReplica::AllTried);
            }
            return r.try_acquire(cap).ok_or(NoReplica::Busy);
        }
        n => {
            let mut rng = rand::rng();
            let i = rng.random_range(0..n);
            let mut j = rng.random_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (&replicas[i], &replicas[j]);
            let (first, second) = if a.in_flight() <= b.in_flight() {
                (a, b)
            } else {
                (b, a)
            };
            for r in [first, second] {
                if eligible(r)
                    && let Some(lease) = r.try_acquire(cap)
                {
                    return Ok(lease);
                }
            }
        }
    }
    // Both choices were full or tried: fall back to a scan of all of them.
    let mut any_eligible = false;
    let mut candidates: Vec<&Arc<Replica>> = replicas.iter().filter(|r| eligible(r)).collect();
    candidates.sort_by_key(|r| r.in_flight());
    for r in candidates {
        any_eligible = true;
        if let Some(lease) = r.try_acquire(cap) {
            return Ok(lease);
        }
    }
    Err(if any_eligible {
        NoReplica::Busy
    } else {
        NoReplica::AllTried
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: u16) -> Vec<Arc<Replica>> {
        (0..n)
            .map(|i| {
                let r = Replica::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), 1);
                r.set_routed(true);
                r
            })
            .collect()
    }

    #[test]
    fn a_replica_unrouted_after_the_snapshot_is_not_taken() {
        // The request loaded the ready set; the replica left it before the pick.
        let rs = replicas(2);
        rs[0].set_routed(false);
        for _ in 0..20 {
            let lease = pick(&rs, None, &[]).unwrap();
            assert_eq!(lease.replica().addr, rs[1].addr);
        }
        rs[1].set_routed(false);
        assert_eq!(pick(&rs, None, &[]).unwrap_err(), NoReplica::Busy);
        assert!(rs.iter().all(|r| r.in_flight() == 0), "no slot kept");
    }

    #[test]
    fn empty_set_has_no_replica() {
        assert_eq!(pick(&[], None, &[]).unwrap_err(), NoReplica::Empty);
    }

    #[test]
    fn spreads_load_evenly() {
        let rs = replicas(4);
        let leases: Vec<_> = (0..400).map(|_| pick(&rs, None, &[]).unwrap()).collect();
        for r in &rs {
            // P2C keeps the spread tight: every replica near 100.
            assert!((80..=120).contains(&r.in_flight()), "{}", r.in_flight());
        }
        drop(leases);
        assert!(rs.iter().all(|r| r.in_flight() == 0));
    }

    #[test]
    fn prefers_the_less_loaded_replica() {
        let rs = replicas(2);
        let _held: Vec<_> = (0..5).map(|_| rs[0].try_acquire(None).unwrap()).collect();
        for _ in 0..3 {
            let lease = pick(&rs, None, &[]).unwrap();
            assert_eq!(lease.replica().addr, rs[1].addr);
            std::mem::forget(lease);
        }
    }

    #[test]
    fn container_concurrency_caps_each_replica() {
        let rs = replicas(3);
        let leases: Vec<_> = (0..6).map(|_| pick(&rs, Some(2), &[]).unwrap()).collect();
        assert!(rs.iter().all(|r| r.in_flight() == 2));
        assert_eq!(pick(&rs, Some(2), &[]).unwrap_err(), NoReplica::Busy);
        drop(leases);
        assert!(pick(&rs, Some(2), &[]).is_ok());
    }

    #[test]
    fn skips_replicas_already_tried() {
        let rs = replicas(3);
        let tried = [rs[0].addr, rs[1].addr];
        for _ in 0..20 {
            assert_eq!(pick(&rs, None, &tried).unwrap().replica().addr, rs[2].addr);
        }
        let all: Vec<_> = rs.iter().map(|r| r.addr).collect();
        assert_eq!(pick(&rs, None, &all).unwrap_err(), NoReplica::AllTried);
    }
}
