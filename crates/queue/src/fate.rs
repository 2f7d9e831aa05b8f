//! Who decides a new message's fate when the broker's confirm does not
//! come: ingress, which withdraws it and answers `451`, or delivery, which
//! already has it from the queue and delivers it (ingress then answers
//! `250`, because the message is durably queued).
//!
//! A publish whose confirm is lost (the broker stalls, the connection
//! drops after the message went out) may still be in the queue. Answering
//! `451` then would be a lie the client pays for with a duplicate: it
//! tries again, and both copies are delivered. So one Redis key per such
//! message, `{prefix}:fate:{queue_id}`, set once by whoever comes first
//! (`SET … NX GET`):
//!
//! - ingress, giving up: `withdrawn`. If delivery came first, the message
//!   is in the queue and the client gets `250` after all.
//! - delivery, taking a message ingress published (attempt 0):
//!   `delivering`. If ingress came first, the message is dropped (acked,
//!   logged, counted as `correu.queue.withdrawn`) and never delivered.
//!
//! Delivery's key only has to outlive ingress's longest wait
//! (`queue.confirm_timeout`); a withdrawal has to outlive the message,
//! which may sit in the broker as long as `queue.max_age`.

use std::time::Duration;

use correu_runtime::config::{QueueConfig, RedisConfig};
use correu_runtime::redis::RedisError;
use deadpool_redis::Pool;

const WITHDRAWN: &str = "withdrawn";
const DELIVERING: &str = "delivering";

/// The outcome of a claim or a withdrawal: who has the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Ingress withdrew it: it must never be delivered.
    Withdrawn,
    /// Delivery has it: it is in the queue and will be delivered.
    Delivering,
}

pub struct Fates {
    pool: Pool,
    prefix: String,
    timeout: Duration,
    claim_ttl: Duration,
    withdrawal_ttl: Duration,
}

impl Fates {
    /// Fates in Redis, when `redis.url` is set.
    pub fn new(queue: &QueueConfig, redis: &RedisConfig) -> Result<Option<Fates>, RedisError> {
        Ok(correu_runtime::redis::pool(redis)?.map(|pool| Fates {
            pool,
            prefix: redis.prefix.clone(),
            timeout: redis.timeout.get(),
            claim_ttl: queue.confirm_timeout.get() + Duration::from_secs(60),
            withdrawal_ttl: queue.max_age.get() + Duration::from_secs(24 * 3600),
        }))
    }

    fn key(&self, queue_id: &str) -> String {
        format!("{}:fate:{queue_id}", self.prefix)
    }

    /// Ingress gives up on `queue_id`: withdrawn, unless delivery has it.
    pub async fn withdraw(&self, queue_id: &str) -> Result<Fate, RedisError> {
        self.decide(queue_id, Fate::Withdrawn).await
    }

    /// Delivery takes `queue_id`: delivering, unless ingress withdrew it.
    /// Taking it again (a redelivery) finds it delivering.
    pub async fn claim(&self, queue_id: &str) -> Result<Fate, RedisError> {
        self.decide(queue_id, Fate::Delivering).await
    }

    async fn decide(&self, queue_id: &str, mine: Fate) -> Result<Fate, RedisError> {
        let (value, ttl) = match mine {
            Fate::Withdrawn => (WITHDRAWN, self.withdrawal_ttl),
            Fate::Delivering => (DELIVERING, self.claim_ttl),
        };
        let key = self.key(queue_id);
        let work = async {
            let mut c = self.pool.get().await?;
            // Redis 7: NX with GET sets only if absent and returns what
            // was there (nil when this call set it).
            let before: Option<String> = deadpool_redis::redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("NX")
                .arg("GET")
                .arg("EX")
                .arg(ttl.as_secs().max(1))
                .query_async(&mut c)
                .await?;
            Ok::<_, RedisError>(before)
        };
        let before = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))??;
        Ok(match before.as_deref() {
            None => mine,
            Some(WITHDRAWN) => Fate::Withdrawn,
            Some(_) => Fate::Delivering,
        })
    }
}
