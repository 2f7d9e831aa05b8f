//! Connections kept for the next message to the same host (connection
//! reuse): after a transaction the client says RSET and waits here, at most
//! `delivery.connection_idle`, at most `max_connections_per_host` per host.
//! A stale one is dropped when taken (the server may have timed it out),
//! and the caller connects anew.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::Client;

/// Connections are interchangeable only for the same address, name (TLS),
/// and route (credentials and TLS policy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    pub host: String,
    pub route: Option<String>,
}

pub struct Pool {
    max_per_key: usize,
    idle: Duration,
    kept: Mutex<HashMap<Key, Vec<(Client, Instant)>>>,
}

impl Pool {
    pub fn new(max_per_key: usize, idle: Duration) -> Pool {
        Pool {
            max_per_key,
            idle,
            kept: Mutex::new(HashMap::new()),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<(Client, Instant)>>> {
        // Plain data; a holder that panicked left it consistent.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh kept connection for `key`, if any (stale ones are dropped,
    /// which closes them).
    pub fn take(&self, key: &Key) -> Option<Client> {
        let mut kept = self.kept();
        let list = kept.get_mut(key)?;
        while let Some((c, since)) = list.pop() {
            if since.elapsed() < self.idle {
                return Some(c);
            }
        }
        kept.remove(key);
        None
    }

    /// Keeps `c`; gives it back when the pool for its key is full or reuse
    /// is off.
    pub fn put(&self, key: Key, c: Client) -> Option<Client> {
        if self.idle.is_zero() {
            return Some(c);
        }
        let mut kept = self.kept();
        let list = kept.entry(key).or_default();
        list.retain(|(_, since)| since.elapsed() < self.idle);
        if list.len() >= self.max_per_key {
            return Some(c);
        }
        list.push((c, Instant::now()));
        None
    }
}
