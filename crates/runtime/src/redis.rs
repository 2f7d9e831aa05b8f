//! The one way Correu makes a Redis pool: from `[redis]`, with the wait,
//! create and recycle timeouts always set, so a slow or absent Redis costs
//! at most `redis.timeout` per call.

use std::time::Duration;

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};

use crate::config::RedisConfig;

/// A Redis call that failed, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("Redis URL: {0}")]
    Config(#[from] deadpool_redis::CreatePoolError),
    #[error("Redis connection: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("Redis: {0}")]
    Command(#[from] deadpool_redis::redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// A pool when `redis.url` is set, else `None`. Nothing connects yet.
pub fn pool(cfg: &RedisConfig) -> Result<Option<Pool>, RedisError> {
    let Some(url) = &cfg.url else {
        return Ok(None);
    };
    let t = Some(cfg.timeout.get());
    let mut pool_cfg = deadpool_redis::Config::from_url(url.as_str());
    pool_cfg.pool = Some(PoolConfig {
        max_size: cfg.pool_size,
        timeouts: Timeouts {
            wait: t,
            create: t,
            recycle: t,
        },
        ..PoolConfig::default()
    });
    Ok(Some(pool_cfg.create_pool(Some(Runtime::Tokio1))?))
}

/// A pool with the key prefix and the per-call deadline of `[redis]`: what
/// a store kept in Redis needs.
#[derive(Clone)]
pub struct Keyed {
    pub pool: Pool,
    pub prefix: String,
    pub timeout: Duration,
}

impl Keyed {
    pub fn new(cfg: &RedisConfig, pool: Pool) -> Keyed {
        Keyed {
            pool,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout.get(),
        }
    }
}
