//! Connections kept for the next message to the same host (connection
//! reuse): after a transaction the client says RSET and waits here, at most
//! its destination's idle time (`delivery.connection_idle`, or its shaping
//! rule's), at most its destination's connection limit per host.
//! A stale one is dropped when taken (the server may have timed it out),
//! and the caller connects anew.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use correu_runtime::limits::Lease;

use crate::client::Client;

/// Connections are interchangeable only for the same address, name (TLS),
/// and route (credentials and TLS policy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    pub host: String,
    pub route: Option<String>,
    /// A connection opened under one TLS policy serves no other.
    pub tls: Option<correu_runtime::config::OutboundTls>,
    /// The budget its lease counts against (the host, or a shaping site).
    pub budget: String,
}

/// A connection with the lease that counts it against its host's limit:
/// the lease lives as long as the connection, kept or in use.
pub struct Kept {
    pub client: Client,
    pub lease: Lease,
}

/// What [`crate::Deliverer::slot`] found.
// Returned once per delivery and moved out at once: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Slot {
    Kept(Kept),
    /// A lease for a new connection.
    New(Lease),
}

/// A kept connection: since when, and for how long it may stay idle.
struct Idle {
    kept: Kept,
    since: Instant,
    idle: Duration,
}

impl Idle {
    fn fresh(&self) -> bool {
        self.since.elapsed() < self.idle
    }
}

#[derive(Default)]
pub struct Pool {
    kept: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        // Plain data; a holder that panicked left it consistent.
        correu_runtime::sync::lock(&self.kept)
    }

    /// The freshest kept connection for `key`, if it has been idle less
    /// than its idle time (stale ones wait for [`Pool::sweep`]).
    pub fn take(&self, key: &Key) -> Option<Kept> {
        let mut kept = self.kept();
        let list = kept.get_mut(key)?;
        // Kept in the order they came back: the last is the freshest.
        if !list.last()?.fresh() {
            return None;
        }
        list.pop().map(|i| i.kept)
    }

    /// Keeps `k` for up to `idle`; gives it back when `max` are kept for
    /// its key already or reuse is off (`idle` 0).
    pub fn put(&self, key: Key, k: Kept, max: usize, idle: Duration) -> Option<Kept> {
        if idle.is_zero() {
            return Some(k);
        }
        let mut kept = self.kept();
        let list = kept.entry(key).or_default();
        if list.len() >= max {
            return Some(k);
        }
        list.push(Idle {
            kept: k,
            since: Instant::now(),
            idle,
        });
        None
    }

    /// The longest-idle kept connection of another key whose lease counts
    /// against `budget`: a site whose leases all sit in idle connections
    /// to one host gives one up for a delivery to another of its hosts.
    pub fn take_other_of(&self, budget: &str, except: &Key) -> Option<Kept> {
        let mut kept = self.kept();
        let (_, list) = kept
            .iter_mut()
            .filter(|(k, list)| k.budget == budget && *k != except && !list.is_empty())
            .min_by_key(|(_, list)| list[0].since)?;
        // The first is the longest idle.
        Some(list.remove(0).kept)
    }

    /// Takes out every connection idle for its idle time or longer, to be
    /// closed and its lease given back.
    pub fn sweep(&self) -> Vec<Kept> {
        let mut out = Vec::new();
        let mut kept = self.kept();
        for list in kept.values_mut() {
            let (fresh, stale): (Vec<Idle>, Vec<Idle>) =
                std::mem::take(list).into_iter().partition(Idle::fresh);
            *list = fresh;
            out.extend(stale.into_iter().map(|i| i.kept));
        }
        kept.retain(|_, list| !list.is_empty());
        out
    }

    /// Takes out every connection (shutdown).
    pub fn drain(&self) -> Vec<Kept> {
        self.kept()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|i| i.kept))
            .collect()
    }
}

/// How long a delivery waits for a connection lease to a busy host before
/// the message goes to a retry tier, and how often it looks meanwhile.
const LEASE_WAIT: Duration = Duration::from_secs(20);
const LEASE_POLL: Duration = Duration::from_millis(200);

/// Leases: connections per host, counted across every delivery process
/// (Redis), held by a connection for as long as it is open.
impl crate::Deliverer {
    /// A way to `key`'s host: a kept connection (with its lease) when one
    /// is fresh, else a lease for a new one; waiting up to `LEASE_WAIT`
    /// while the host is at its limit, for whichever comes first: a
    /// connection put back after its transaction (in this process) or a
    /// lease given back (in any).
    pub(crate) async fn slot(&self, key: &Key, dest: &crate::shaping::Dest) -> Option<Slot> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            let freed = self.lease_freed.notified();
            if let Some(k) = self.pool.take(key) {
                return Some(Slot::Kept(k));
            }
            if let Some(l) = self
                .leases
                .acquire("conn", &dest.budget, dest.max_connections)
                .await
            {
                return Some(Slot::New(l));
            }
            // A site's leases held by idle connections to its other hosts:
            // close one and take its place.
            if let Some(idle) = self.pool.take_other_of(&dest.budget, key) {
                idle.client.quit().await;
                self.release(idle.lease).await;
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(LEASE_POLL) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    pub(crate) async fn release(&self, lease: correu_runtime::limits::Lease) {
        self.leases.release(lease).await;
        self.lease_freed.notify_waiters();
    }

    /// After a transaction: RSET and keep the connection, lease and all,
    /// for the next message to the same host; QUIT when the pool is full
    /// or the connection has carried its destination's
    /// `max_messages_per_connection`.
    pub(crate) async fn keep_or_quit(&self, key: Key, mut k: Kept, dest: &crate::shaping::Dest) {
        let spent = dest.max_messages_per_connection > 0
            && u64::from(k.client.uses) >= dest.max_messages_per_connection;
        if spent {
            k.client.quit().await;
            self.release(k.lease).await;
            return;
        }
        if k.client.reset().await.is_err() {
            self.release(k.lease).await;
            return;
        }
        match self.pool.put(key, k, dest.max_connections, dest.idle) {
            Some(k) => {
                k.client.quit().await;
                self.release(k.lease).await;
            }
            // A delivery waiting for this host may take it now.
            None => self.lease_freed.notify_waiters(),
        }
    }

    /// Closes kept connections idle past `connection_idle` (all of them
    /// when `everything`), giving their leases back.
    pub(crate) async fn close_kept(&self, everything: bool) {
        let out = if everything {
            self.pool.drain()
        } else {
            self.pool.sweep()
        };
        for k in out {
            k.client.quit().await;
            self.release(k.lease).await;
        }
    }
}
