//! Limits shared by replicas: open connections per client (per process),
//! rates (fixed windows) and leases (concurrent connections per
//! destination host), kept in Redis with an in-process fallback when Redis
//! is absent or down: a limit may loosen for a while, mail keeps flowing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_redis::Pool;

use crate::config::{Rate, RedisConfig};

/// Most windows kept in memory before old ones are dropped.
const LOCAL_KEYS: usize = 100_000;
/// At most one "Redis is down" warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

use crate::sync::lock;

/// Open connections per client address.
pub struct Concurrency {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One client connection counted; uncounted when dropped.
pub struct Slot {
    owner: Arc<Concurrency>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = lock(&self.owner.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Concurrency {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Concurrency {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a connection from `ip`, or `None` when it already has the most.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = lock(&self.open);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }
}

/// Fixed-window rate counters.
pub struct RateLimiter {
    redis: Option<Pool>,
    prefix: String,
    timeout: Duration,
    local: Mutex<HashMap<String, u64>>,
    /// Holds ([`RateLimiter::hold`]) without Redis.
    holds: Mutex<HashMap<String, Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter on Redis when `cfg.url` is set (every pool timeout set),
    /// else in this process only.
    pub fn new(cfg: &RedisConfig) -> anyhow::Result<RateLimiter> {
        Ok(Self::with_pool(cfg, crate::redis::pool(cfg)?))
    }

    /// The same, on a pool the caller shares with others.
    pub fn with_pool(cfg: &RedisConfig, redis: Option<Pool>) -> RateLimiter {
        RateLimiter {
            redis,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout.get(),
            local: Mutex::new(HashMap::new()),
            holds: Mutex::new(HashMap::new()),
            last_warning: Mutex::new(None),
        }
    }

    /// Counts one event of `kind` for `id`; false when over `rate`.
    pub async fn allow(&self, kind: &str, id: &str, rate: Rate) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        self.count("rate", kind, id, rate.per, 1).await <= rate.count
    }

    /// Events of `kind` for `id` in the current window of `per` (shared
    /// through Redis), after adding `add` (0 to only look).
    pub async fn tally(&self, kind: &str, id: &str, per: Duration, add: u64) -> u64 {
        self.count("tally", kind, id, per, add).await
    }

    /// Holds `id` off for `span` (a destination that said to slow down),
    /// for every process sharing Redis.
    pub async fn hold(&self, kind: &str, id: &str, span: Duration) {
        let key = format!("{}:hold:{kind}:{id}", self.prefix);
        let millis = span.as_millis().max(1) as u64;
        if let Some(pool) = &self.redis {
            let work = async {
                let mut c = pool.get().await?;
                // The latest word of the destination wins.
                deadpool_redis::redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(millis)
                    .query_async::<()>(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(())
            };
            match tokio::time::timeout(self.timeout, work).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => self.warn(&e.to_string()),
                Err(_) => self.warn("timed out"),
            }
        }
        let until = Instant::now() + span;
        let mut holds = lock(&self.holds);
        holds.retain(|_, t| *t > Instant::now());
        holds.insert(key, until);
    }

    /// How much longer `id` is held off, if it is.
    pub async fn held(&self, kind: &str, id: &str) -> Option<Duration> {
        let key = format!("{}:hold:{kind}:{id}", self.prefix);
        if let Some(pool) = &self.redis {
            let work = async {
                let mut c = pool.get().await?;
                let ms: i64 = deadpool_redis::redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(ms)
            };
            match tokio::time::timeout(self.timeout, work).await {
                Ok(Ok(ms)) => return (ms > 0).then(|| Duration::from_millis(ms as u64)),
                Ok(Err(e)) => self.warn(&e.to_string()),
                Err(_) => self.warn("timed out"),
            }
        }
        let holds = lock(&self.holds);
        holds
            .get(&key)
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// The counter behind both: one key per window, in Redis (expiring
    /// after two windows) or, without it or while it fails, in this process.
    async fn count(&self, space: &str, kind: &str, id: &str, per: Duration, add: u64) -> u64 {
        let per = per.as_secs().max(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let key = format!("{}:{space}:{kind}:{id}:{}", self.prefix, now / per);
        if let Some(pool) = &self.redis {
            let work = async {
                if add == 0 {
                    let mut c = pool.get().await?;
                    let n: Option<u64> = deadpool_redis::redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut c)
                        .await?;
                    Ok::<_, anyhow::Error>(n.unwrap_or(0))
                } else {
                    incr_by(pool, &key, add, per * 2).await
                }
            };
            match tokio::time::timeout(self.timeout, work).await {
                Ok(Ok(n)) => return n,
                Ok(Err(e)) => self.warn(&e.to_string()),
                Err(_) => self.warn("timed out"),
            }
        }
        let mut local = lock(&self.local);
        if local.len() >= LOCAL_KEYS {
            // Windows are short: forgetting them all costs at most one
            // window of leniency.
            local.clear();
        }
        let n = local.entry(key).or_insert(0);
        *n += add;
        *n
    }

    fn warn(&self, why: &str) {
        let mut last = lock(&self.last_warning);
        if last.is_none_or(|t| t.elapsed() > WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                error = why,
                "Redis unavailable: rate limits are per process until it is back"
            );
        }
    }
}

/// Takes a lease if fewer than `max` live ones exist; expired leases (a
/// holder that died) are dropped first.
const LEASE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Pushes a held lease's expiry forward; 0 when it had already expired
/// (and another holder may have taken its place).
const RENEW_SCRIPT: &str = r"
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// At most `max` holders at once per key, across every replica sharing
/// Redis (delivery: connections per destination host).
pub struct Leases {
    redis: Option<Pool>,
    prefix: String,
    timeout: Duration,
    /// How long a lease lives if its holder never gives it back.
    ttl: Duration,
    local: Mutex<HashMap<String, usize>>,
    last_warning: Mutex<Option<Instant>>,
}

/// A lease held; give it back with [`Leases::release`].
#[derive(Debug)]
pub struct Lease {
    key: String,
    token: String,
    /// Taken from the in-process table (Redis was unavailable).
    local: bool,
    /// When it was taken or last renewed.
    since: Instant,
}

impl Leases {
    pub fn new(cfg: &RedisConfig, ttl: Duration) -> anyhow::Result<Leases> {
        Ok(Self::with_pool(cfg, crate::redis::pool(cfg)?, ttl))
    }

    /// The same, on a pool the caller shares with others.
    pub fn with_pool(cfg: &RedisConfig, redis: Option<Pool>, ttl: Duration) -> Leases {
        Leases {
            redis,
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout.get(),
            ttl,
            local: Mutex::new(HashMap::new()),
            last_warning: Mutex::new(None),
        }
    }

    /// A lease on `kind`/`id` if fewer than `max` are out.
    pub async fn acquire(&self, kind: &str, id: &str, max: usize) -> Option<Lease> {
        let key = format!("{}:lease:{kind}:{id}", self.prefix);
        let token = format!("{}-{:x}", std::process::id(), rand::random::<u64>());
        if let Some(pool) = &self.redis {
            let now = now_millis();
            let work = async {
                let mut c = pool.get().await?;
                let got: i64 = deadpool_redis::redis::cmd("EVAL")
                    .arg(LEASE_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(now)
                    .arg(self.ttl.as_millis() as u64)
                    .arg(max)
                    .arg(&token)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(got == 1)
            };
            match tokio::time::timeout(self.timeout, work).await {
                Ok(Ok(true)) => {
                    return Some(Lease {
                        key,
                        token,
                        local: false,
                        since: Instant::now(),
                    });
                }
                Ok(Ok(false)) => return None,
                Ok(Err(e)) => warn_redis(&self.last_warning, &e.to_string()),
                Err(_) => warn_redis(&self.last_warning, "timed out"),
            }
        }
        let mut local = lock(&self.local);
        let n = local.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Lease {
            key,
            token,
            local: true,
            since: Instant::now(),
        })
    }

    /// Keeps a lease held past its TTL (a kept connection that goes on
    /// being used): renewed in Redis once half the TTL has passed. False
    /// when the lease had expired: the holder must give up what it guards.
    pub async fn renew(&self, lease: &mut Lease) -> bool {
        if lease.local || lease.since.elapsed() < self.ttl / 2 {
            return true;
        }
        let Some(pool) = &self.redis else {
            return true;
        };
        let work = async {
            let mut c = pool.get().await?;
            let renewed: i64 = deadpool_redis::redis::cmd("EVAL")
                .arg(RENEW_SCRIPT)
                .arg(1)
                .arg(&lease.key)
                .arg(now_millis())
                .arg(self.ttl.as_millis() as u64)
                .arg(&lease.token)
                .query_async(&mut c)
                .await?;
            Ok::<_, anyhow::Error>(renewed == 1)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(renewed)) => {
                lease.since = Instant::now();
                renewed
            }
            // Redis is away: the lease stands until its TTL, as it would.
            Ok(Err(e)) => {
                warn_redis(&self.last_warning, &e.to_string());
                true
            }
            Err(_) => {
                warn_redis(&self.last_warning, "timed out");
                true
            }
        }
    }

    /// Gives a lease back.
    pub async fn release(&self, lease: Lease) {
        if lease.local {
            let mut local = lock(&self.local);
            if let Some(n) = local.get_mut(&lease.key) {
                *n = n.saturating_sub(1);
            }
            return;
        }
        if let Some(pool) = &self.redis {
            let work = async {
                let mut c = pool.get().await?;
                deadpool_redis::redis::cmd("ZREM")
                    .arg(&lease.key)
                    .arg(&lease.token)
                    .query_async::<i64>(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(())
            };
            // A lease not given back expires with its TTL.
            if !matches!(tokio::time::timeout(self.timeout, work).await, Ok(Ok(()))) {
                warn_redis(&self.last_warning, "lease not released; it will expire");
            }
        }
    }
}

fn warn_redis(last: &Mutex<Option<Instant>>, why: &str) {
    crate::metrics::REDIS_ERRORS.add(1, &[]);
    let mut last = lock(last);
    if last.is_none_or(|t| t.elapsed() > WARN_EVERY) {
        *last = Some(Instant::now());
        tracing::warn!(
            error = why,
            "Redis unavailable: limits are per process until it is back"
        );
    }
}

async fn incr_by(pool: &Pool, key: &str, by: u64, ttl_secs: u64) -> anyhow::Result<u64> {
    let mut conn = pool.get().await?;
    let (n,): (u64,) = deadpool_redis::redis::pipe()
        .atomic()
        .incr(key, by)
        .expire(key, ttl_secs as i64)
        .ignore()
        .query_async(&mut conn)
        .await?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connections_per_address() {
        let c = Concurrency::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = c.enter(ip).unwrap();
        let _b = c.enter(ip).unwrap();
        assert!(c.enter(ip).is_none());
        assert!(c.enter("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert!(c.enter(ip).is_some());
    }

    #[tokio::test]
    async fn local_rates_without_redis() {
        let r = RateLimiter::new(&RedisConfig::default()).unwrap();
        let rate = Rate::per(3, 3600);
        let mut allowed = 0;
        for _ in 0..5 {
            allowed += usize::from(r.allow("conn", "192.0.2.1", rate).await);
        }
        assert_eq!(allowed, 3);
        assert!(r.allow("conn", "192.0.2.2", rate).await);
        assert!(r.allow("conn", "192.0.2.1", Rate::per(0, 1)).await);
    }
}
