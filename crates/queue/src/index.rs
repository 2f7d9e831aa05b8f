//! An informational index of deferred messages in Redis, so operators can
//! see RabbitMQ's waiting retries ("where is my mail?"). Never the source
//! of truth: losing it loses nothing but the listing, and every entry
//! expires on its own an hour after its next attempt.

use correu_runtime::redis::RedisError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_runtime::config::RedisConfig;
use deadpool_redis::Pool;
use deadpool_redis::redis::AsyncCommands;

use crate::QueueError;
use crate::admin::Deferred;

/// Kept this long after the next attempt is due.
const LINGER: Duration = Duration::from_secs(3600);

pub struct DeferredIndex {
    pool: Pool,
    prefix: String,
    timeout: Duration,
}

impl DeferredIndex {
    /// The index, when `redis.url` is set.
    pub fn new(cfg: &RedisConfig) -> Result<Option<DeferredIndex>, QueueError> {
        Ok(Self::with_pool(cfg, correu_runtime::redis::pool(cfg)?))
    }

    /// The same, on a pool the caller shares with others.
    pub fn with_pool(
        cfg: &RedisConfig,
        pool: Option<deadpool_redis::Pool>,
    ) -> Option<DeferredIndex> {
        pool.map(|pool| DeferredIndex {
            pool,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout.get(),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:deferred:{id}", self.prefix)
    }

    /// Records a message scheduled for a retry after `delay`.
    pub async fn record(&self, d: &Deferred, delay: Duration) -> Result<(), QueueError> {
        let key = self.key(&d.queue_id);
        let fields = [
            ("next", d.next_attempt_unix_ms.to_string()),
            ("attempts", d.attempts.to_string()),
            ("error", d.last_error.clone()),
            ("recipients", d.recipients.join(",")),
        ];
        let ttl = (delay + LINGER).as_secs() as i64;
        let work = async {
            let mut c = self.pool.get().await.map_err(RedisError::from)?;
            deadpool_redis::redis::pipe()
                .hset_multiple(&key, &fields)
                .ignore()
                .expire(&key, ttl)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(RedisError::from)
        };
        Ok(tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))??)
    }

    /// Forgets a message that is settled (delivered, bounced, deleted).
    pub async fn remove(&self, id: &str) -> Result<(), QueueError> {
        let key = self.key(id);
        let work = async {
            let mut c = self.pool.get().await.map_err(RedisError::from)?;
            c.del::<_, ()>(&key).await.map_err(RedisError::from)
        };
        Ok(tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))??)
    }

    /// Up to `limit` entries.
    pub async fn list(&self, limit: usize) -> Result<Vec<Deferred>, QueueError> {
        let pattern = format!("{}:deferred:*", self.prefix);
        let mut c = self.pool.get().await.map_err(RedisError::from)?;
        let mut keys: Vec<String> = Vec::new();
        {
            let mut iter = c
                .scan_match::<_, String>(&pattern)
                .await
                .map_err(RedisError::from)?;
            while let Some(k) = futures_util::StreamExt::next(&mut iter).await {
                keys.push(k.map_err(RedisError::from)?);
                if keys.len() >= limit {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        for key in keys {
            let h: std::collections::HashMap<String, String> =
                c.hgetall(&key).await.map_err(RedisError::from)?;
            let id = key.rsplit(':').next().unwrap_or_default().to_string();
            out.push(Deferred {
                queue_id: id,
                next_attempt_unix_ms: h.get("next").and_then(|v| v.parse().ok()).unwrap_or(0),
                attempts: h.get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
                last_error: h.get("error").cloned().unwrap_or_default(),
                recipients: h
                    .get("recipients")
                    .map(|r| {
                        r.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

/// Milliseconds since the epoch, `delay` from now.
pub fn due_in(delay: Duration) -> i64 {
    (SystemTime::now() + delay)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
