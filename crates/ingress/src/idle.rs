//! Which sessions are idle, so that when every connection slot is taken
//! the session that has waited longest for its client gives way to a new
//! one (instead of the new client getting `421 4.3.2` while slow or silent
//! ones hold every slot).
//!
//! A session is idle while it waits for a command line; reading DATA,
//! checking a recipient or queuing a message is never idle, so eviction
//! never cuts a message off. Idleness counts from the end of the last
//! complete command, not the last byte: a client that drips a byte at a
//! time is as idle as a silent one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A session idle for less than this is never evicted: it is between two
/// commands of a client that is working.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// Every session of a process.
pub struct Sessions {
    epoch: Instant,
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
}

struct Entry {
    /// Milliseconds from `epoch` to when the session started waiting, plus
    /// one; 0 while it is busy.
    waiting_since: AtomicU64,
    evict: CancellationToken,
}

/// One session's place in [`Sessions`]; it leaves when dropped.
pub struct Registration {
    sessions: Arc<Sessions>,
    id: u64,
    entry: Arc<Entry>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl Sessions {
    /// A new session, idle from now (it has said nothing yet).
    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            waiting_since: AtomicU64::new(0),
            evict: CancellationToken::new(),
        });
        let r = Registration {
            sessions: self.clone(),
            id,
            entry: entry.clone(),
        };
        r.waiting(Instant::now());
        correu_runtime::sync::lock(&self.entries).insert(id, entry);
        r
    }

    /// Asks the session idle longest, if one has been idle at least
    /// `min_idle`, to close; whether one was asked.
    pub fn evict_idlest(&self, min_idle: Duration) -> bool {
        let now = self.millis(Instant::now());
        let limit = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let entries = correu_runtime::sync::lock(&self.entries);
        let idlest = entries
            .values()
            .filter(|e| !e.evict.is_cancelled())
            .filter_map(|e| match e.waiting_since.load(Ordering::Relaxed) {
                0 => None,
                since => Some((since - 1, e)),
            })
            .filter(|(since, _)| now.saturating_sub(*since) >= limit)
            .min_by_key(|(since, _)| *since);
        match idlest {
            Some((_, e)) => {
                e.evict.cancel();
                true
            }
            None => false,
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        correu_runtime::sync::lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1)
    }
}

impl Registration {
    /// The session waits for its client, since `since`.
    pub fn waiting(&self, since: Instant) {
        let ms = self.sessions.millis(since) + 1;
        self.entry.waiting_since.store(ms, Ordering::Relaxed);
    }

    /// The session is working (a command came, a message is being read).
    pub fn busy(&self) {
        self.entry.waiting_since.store(0, Ordering::Relaxed);
    }

    /// Resolves once the session has been asked to give way.
    pub async fn evicted(&self) {
        self.entry.evict.cancelled().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        correu_runtime::sync::lock(&self.sessions.entries).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_idlest_waiting_session_gives_way_and_busy_ones_never_do() {
        let sessions = Arc::new(Sessions::default());
        let oldest_but_busy = sessions.register();
        tokio::time::advance(Duration::from_secs(5)).await;
        let idle_long = sessions.register();
        tokio::time::advance(Duration::from_secs(3)).await;
        let idle_short = sessions.register();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let fresh = sessions.register();
        oldest_but_busy.busy();
        assert_eq!(sessions.len(), 4);

        assert!(sessions.evict_idlest(EVICT_AFTER));
        assert!(idle_long.entry.evict.is_cancelled());
        assert!(!oldest_but_busy.entry.evict.is_cancelled());
        // Asked once; the next eviction takes the next idlest.
        assert!(sessions.evict_idlest(EVICT_AFTER));
        assert!(idle_short.entry.evict.is_cancelled());
        // The fresh one has waited under a second: nobody is left.
        assert!(!sessions.evict_idlest(EVICT_AFTER));
        assert!(!fresh.entry.evict.is_cancelled());
        drop(fresh);
        assert_eq!(sessions.len(), 3);
        tokio::time::timeout(Duration::from_millis(10), idle_long.evicted())
            .await
            .expect("an evicted session hears of it");
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_last_command_not_the_last_byte() {
        let sessions = Arc::new(Sessions::default());
        let dripping = sessions.register();
        let since = Instant::now();
        dripping.waiting(since);
        // Bytes come, but no command completes: the session stays idle
        // since `since`.
        tokio::time::advance(Duration::from_secs(4)).await;
        let working = sessions.register();
        tokio::time::advance(Duration::from_secs(2)).await;
        working.waiting(Instant::now() - Duration::from_millis(1200));
        assert!(sessions.evict_idlest(EVICT_AFTER));
        assert!(dripping.entry.evict.is_cancelled());
        assert!(!working.entry.evict.is_cancelled());
    }
}
