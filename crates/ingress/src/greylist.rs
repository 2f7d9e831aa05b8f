//! Greylisting (RFC 6647): the first message of a triplet (the client's
//! network, /24 or /64; the sender; a recipient) is deferred with
//! `451 4.7.1`. A retry after `inbound.greylist.delay` passes, and the
//! triplet then passes without waiting for `pass_for`, renewed by each
//! message. The triplets live in Redis when it is configured, so every
//! ingress replica sees the same ones (a retry usually reaches another
//! pod); without it, or while it fails, in this process. It is decided
//! when the message is in, after verification, so a sender whose domain
//! is in `skip_domains` and passed SPF or DKIM is never held.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_runtime::config::{GreylistConfig, RedisConfig};
use correu_runtime::sync::lock;
use deadpool_redis::Pool;

/// Most triplets kept in memory without Redis before the oldest go.
const LOCAL_TRIPLETS: usize = 100_000;

/// One triplet, atomically: `-1` new (wait the whole delay), `0` passes,
/// else the milliseconds still to wait.
const SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return -1
end
if v == 'ok' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 0
end
local waited = now - tonumber(v)
if waited >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], 'ok', 'PX', ARGV[4])
  return 0
end
return tonumber(ARGV[2]) - waited
";

pub struct Greylist {
    redis: Option<Pool>,
    prefix: String,
    timeout: Duration,
    delay: Duration,
    expire: Duration,
    pass_for: Duration,
    skip: Vec<String>,
    local: Mutex<HashMap<String, Seen>>,
}

#[derive(Clone, Copy)]
enum Seen {
    First(u64),
    Passed(u64),
}

/// What a message's triplets say.
#[derive(Debug, PartialEq, Eq)]
pub enum Grey {
    Pass,
    /// Deferred: this long still to wait.
    Wait(Duration),
}

impl Greylist {
    /// `None` when greylisting is off.
    pub fn new(cfg: &GreylistConfig, redis: &RedisConfig, pool: Option<Pool>) -> Option<Self> {
        cfg.enabled.then(|| Greylist {
            redis: pool,
            prefix: redis.prefix.clone(),
            timeout: redis.timeout.get(),
            delay: cfg.delay.get(),
            expire: cfg.expire.get(),
            pass_for: cfg.pass_for.get(),
            skip: cfg
                .skip_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            local: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a message is exempt: a domain that passed SPF or DKIM is
    /// one of `skip_domains` or under one.
    pub fn skips(&self, passed: &[String]) -> bool {
        passed.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            self.skip
                .iter()
                .any(|s| d == *s || d.ends_with(&format!(".{s}")))
        })
    }

    /// Looks up (and records) the triplet of each recipient; the longest
    /// wait among them, or `Pass` when every one passes.
    pub async fn check(&self, client: IpAddr, sender: &str, recipients: &[String]) -> Grey {
        let net = network(client);
        let sender = sender.to_ascii_lowercase();
        let mut longest: Option<Duration> = None;
        for rcpt in recipients {
            let key = format!(
                "{}:grey:{net}:{sender}:{}",
                self.prefix,
                rcpt.to_ascii_lowercase()
            );
            let left = self.one(&key).await;
            if left > 0 {
                let left = Duration::from_millis(left);
                longest = Some(longest.map_or(left, |l| l.max(left)));
            }
        }
        match longest {
            None => Grey::Pass,
            Some(d) => Grey::Wait(d),
        }
    }

    /// Milliseconds still to wait for one triplet (0: it passes).
    async fn one(&self, key: &str) -> u64 {
        let now = now_millis();
        let ms = |d: Duration| d.as_millis() as u64;
        if let Some(pool) = &self.redis {
            let work = async {
                let mut c = pool.get().await?;
                let left: i64 = deadpool_redis::redis::cmd("EVAL")
                    .arg(SCRIPT)
                    .arg(1)
                    .arg(key)
                    .arg(now)
                    .arg(ms(self.delay))
                    .arg(ms(self.expire))
                    .arg(ms(self.pass_for))
                    .query_async(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(left)
            };
            match tokio::time::timeout(self.timeout, work).await {
                Ok(Ok(-1)) => return ms(self.delay).max(1),
                Ok(Ok(left)) => return u64::try_from(left).unwrap_or(0),
                // Redis away: nobody is held back for it (greylisting is
                // a filter, not a promise), and it is said.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "greylisting: Redis failed; this message passes");
                    return 0;
                }
                Err(_) => {
                    tracing::warn!("greylisting: Redis timed out; this message passes");
                    return 0;
                }
            }
        }
        let mut local = lock(&self.local);
        if local.len() >= LOCAL_TRIPLETS {
            let (expire, pass_for) = (ms(self.expire), ms(self.pass_for));
            local.retain(|_, s| match *s {
                Seen::First(t) => now.saturating_sub(t) < expire,
                Seen::Passed(t) => now.saturating_sub(t) < pass_for,
            });
        }
        match local.get(key).copied() {
            Some(Seen::Passed(t)) if now.saturating_sub(t) < ms(self.pass_for) => {
                local.insert(key.to_string(), Seen::Passed(now));
                0
            }
            Some(Seen::First(t)) if now.saturating_sub(t) < ms(self.expire) => {
                let waited = now.saturating_sub(t);
                if waited >= ms(self.delay) {
                    local.insert(key.to_string(), Seen::Passed(now));
                    0
                } else {
                    ms(self.delay) - waited
                }
            }
            _ => {
                local.insert(key.to_string(), Seen::First(now));
                ms(self.delay).max(1)
            }
        }
    }
}

/// The client's network as greylisting sees it: a /24 for IPv4, a /64
/// for IPv6 (a sender's retries often come from another address of the
/// same pool).
pub fn network(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(delay_ms: u64) -> Greylist {
        let cfg = GreylistConfig {
            enabled: true,
            delay: correu_runtime::config::Dur(Duration::from_millis(delay_ms)),
            skip_domains: vec!["bigmail.test".into()],
            ..GreylistConfig::default()
        };
        Greylist::new(&cfg, &RedisConfig::default(), None).unwrap()
    }

    #[test]
    fn networks_are_a_24_and_a_64() {
        assert_eq!(network("192.0.2.77".parse().unwrap()), "192.0.2.0/24");
        assert_eq!(
            network("2001:db8:aa:bb:1:2:3:4".parse().unwrap()),
            "2001:db8:aa:bb::/64"
        );
        assert_eq!(network("::ffff:192.0.2.1".parse().unwrap()), "192.0.2.0/24");
    }

    #[test]
    fn passed_domains_under_a_skipped_one_skip() {
        let g = grey(1000);
        assert!(g.skips(&["bigmail.test".into()]));
        assert!(g.skips(&["eu.BigMail.test".into()]));
        assert!(!g.skips(&["notbigmail.test".into()]));
        assert!(!g.skips(&[]));
    }

    #[tokio::test]
    async fn a_new_triplet_waits_a_retry_after_the_delay_passes_and_then_it_is_known() {
        let g = grey(200);
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let to = vec!["pere@example.org".to_string()];
        assert!(matches!(g.check(ip, "jo@a.test", &to).await, Grey::Wait(_)));
        // Too soon: still waiting, for less.
        match g.check(ip, "jo@a.test", &to).await {
            Grey::Wait(d) => assert!(d <= Duration::from_millis(200)),
            Grey::Pass => panic!("passed before the delay"),
        }
        // Another address of the same /24 is the same sender's retry.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sibling: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(g.check(sibling, "JO@a.test", &to).await, Grey::Pass);
        assert_eq!(g.check(ip, "jo@a.test", &to).await, Grey::Pass);
        // A new recipient in the same message is a new triplet.
        let two = vec![to[0].clone(), "ana@example.org".to_string()];
        assert!(matches!(
            g.check(ip, "jo@a.test", &two).await,
            Grey::Wait(_)
        ));
        // Another network is another triplet.
        let elsewhere: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(matches!(
            g.check(elsewhere, "jo@a.test", &to).await,
            Grey::Wait(_)
        ));
    }
}
