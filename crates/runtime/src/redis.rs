//! The one way Correu makes a Redis pool: from `[redis]`, with the wait,
//! create and recycle timeouts always set, so a slow or absent Redis costs
//! at most `redis.timeout` per call.

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};

use crate::config::RedisConfig;

/// A pool when `redis.url` is set, else `None`. Nothing connects yet.
pub fn pool(cfg: &RedisConfig) -> anyhow::Result<Option<Pool>> {
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
