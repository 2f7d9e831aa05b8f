//! `[redis]`: what replicas share (rates, connection leases, the retry
//! index); optional.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::Dur;

/// Redis, shared by replicas for rate limits; optional.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://host:port/db`; unset: limits are kept in each process.
    pub url: Option<String>,
    /// Prefix of every key Correu writes.
    pub prefix: String,
    /// Deadline of every Redis call (and of getting a connection).
    pub timeout: Dur,
    /// Connections per process.
    pub pool_size: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            prefix: "correu".into(),
            timeout: Dur(Duration::from_millis(250)),
            pool_size: 16,
        }
    }
}

impl RedisConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        if !c.role.uses_redis() {
            return;
        }
        if let Some(url) = &self.url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
        {
            c.err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            );
        }
        if self.pool_size == 0 {
            c.err("redis.pool_size", "must be more than 0");
        }
    }
}
