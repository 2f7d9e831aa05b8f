//! Local recipients known to exist, remembered for `smtp.recipient_cache`
//! so that a busy MX does not ask storage about the same mailbox at every
//! RCPT (Postfix's verify cache and Dovecot's auth cache do the same).
//!
//! Only "exists" is remembered: a new account is accepted at once, and an
//! unknown or full mailbox is asked again every time. For the cache's
//! lifetime an account deleted meanwhile can still be offered mail
//! (delivery then gets "no such mailbox" and bounces it), and so can a
//! mailbox that filled up meanwhile (delivery then waits with 4.2.2 and
//! tries again, as for any full mailbox). An address whose answer depends
//! on more than existing is never remembered: one with a quota (the
//! answer depends on SIZE=) or an alias that forwards to other domains
//! (its targets are queued). An address that becomes such an alias while
//! remembered is taken as a plain recipient for the rest of the lifetime.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// Tokio's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// Most addresses remembered; past it the expired ones go, then all.
const MAX_REMEMBERED: usize = 100_000;

pub struct KnownRecipients {
    ttl: Duration,
    known: Mutex<HashMap<String, Instant>>,
}

impl KnownRecipients {
    /// Remembers for `ttl`; zero remembers nothing.
    pub fn new(ttl: Duration) -> Self {
        KnownRecipients {
            ttl,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // A map of timestamps is consistent whatever panicked while it was held.
        correu_runtime::sync::lock(&self.known)
    }

    /// Whether storage said `address` exists less than the lifetime ago.
    pub fn exists(&self, address: &str) -> bool {
        !self.ttl.is_zero()
            && self
                .known()
                .get(address)
                .is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Storage said `address` exists.
    pub fn remember(&self, address: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let mut known = self.known();
        if known.len() >= MAX_REMEMBERED && !known.contains_key(address) {
            let ttl = self.ttl;
            known.retain(|_, at| at.elapsed() < ttl);
            // Nearly all still fresh: start over rather than sweep the whole
            // map again at the next insert.
            if known.len() >= MAX_REMEMBERED / 10 * 9 {
                known.clear();
            }
        }
        known.insert(address.to_string(), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_for_its_lifetime_only() {
        let k = KnownRecipients::new(Duration::from_secs(10));
        assert!(!k.exists("ana@localhost"));
        k.remember("ana@localhost");
        assert!(k.exists("ana@localhost"));
        assert!(!k.exists("pere@localhost"));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(k.exists("ana@localhost"), "still fresh");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!k.exists("ana@localhost"), "expired");
    }

    #[test]
    fn zero_remembers_nothing() {
        let k = KnownRecipients::new(Duration::ZERO);
        k.remember("ana@localhost");
        assert!(!k.exists("ana@localhost"));
    }

    #[test]
    fn stays_bounded() {
        let k = KnownRecipients::new(Duration::from_secs(60));
        for i in 0..MAX_REMEMBERED + 10 {
            k.remember(&format!("u{i}@localhost"));
        }
        assert!(k.known().len() <= MAX_REMEMBERED);
        assert!(k.exists(&format!("u{}@localhost", MAX_REMEMBERED + 9)));
    }
}
