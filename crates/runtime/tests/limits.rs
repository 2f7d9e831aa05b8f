//! Rates and leases shared through the real Redis, and what happens
//! without it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use correu_runtime::config::{Dur, Rate, RedisConfig};
use correu_runtime::limits::{Leases, RateLimiter};

fn redis(prefix: &str) -> RedisConfig {
    RedisConfig {
        url: Some("redis://127.0.0.1:6379".into()),
        prefix: prefix.into(),
        ..RedisConfig::default()
    }
}

/// Deletes the test's keys (they expire anyway).
fn cleanup(prefix: &str) {
    let out = std::process::Command::new("redis-cli")
        .args(["--scan", "--pattern", &format!("{prefix}:*")])
        .output()
        .expect("redis-cli (scripts/test installs it)");
    for key in String::from_utf8_lossy(&out.stdout).lines() {
        let _deleted = std::process::Command::new("redis-cli")
            .args(["del", key])
            .output();
    }
}

#[tokio::test]
async fn two_replicas_share_one_count_in_redis() {
    let prefix = format!("correu-test-{}", std::process::id());
    let a = RateLimiter::new(&redis(&prefix)).unwrap();
    let b = RateLimiter::new(&redis(&prefix)).unwrap();
    let rate = Rate::per(4, 3600);
    let mut allowed = 0;
    for i in 0..8 {
        let r = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(r.allow("conn", "192.0.2.1", rate).await);
    }
    assert_eq!(allowed, 4, "the limit holds across both replicas");
    // The count is really in Redis.
    let out = std::process::Command::new("redis-cli")
        .args([
            "--scan",
            "--pattern",
            &format!("{prefix}:rate:conn:192.0.2.1:*"),
        ])
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .expect("a key in Redis")
        .to_string();
    let n = std::process::Command::new("redis-cli")
        .args(["get", &key])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&n.stdout).trim(), "8");
    let ttl = std::process::Command::new("redis-cli")
        .args(["ttl", &key])
        .output()
        .unwrap();
    let ttl: i64 = String::from_utf8_lossy(&ttl.stdout).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 7200, "keys expire: ttl {ttl}");
    cleanup(&prefix);
}

#[tokio::test]
async fn without_redis_the_limit_is_local_and_quick() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = RedisConfig {
        url: Some(format!("redis://127.0.0.1:{port}")),
        timeout: Dur(Duration::from_millis(200)),
        ..RedisConfig::default()
    };
    let r = RateLimiter::new(&cfg).unwrap();
    let rate = Rate::per(2, 3600);
    let started = Instant::now();
    let results = [
        r.allow("msg", "192.0.2.9", rate).await,
        r.allow("msg", "192.0.2.9", rate).await,
        r.allow("msg", "192.0.2.9", rate).await,
    ];
    assert_eq!(results, [true, true, false], "local counting still limits");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "each call bounded by the Redis timeout"
    );
}

#[tokio::test]
async fn leases_hold_across_two_processes_sharing_redis() {
    let prefix = format!("correu-lease-{}", std::process::id());
    // Two limiters with pools of their own: two delivery pods.
    let a = Leases::new(&redis(&prefix), Duration::from_secs(60)).unwrap();
    let b = Leases::new(&redis(&prefix), Duration::from_secs(60)).unwrap();
    let first = a
        .acquire("conn", "mx.remote.test", 2)
        .await
        .expect("a lease");
    let second = b
        .acquire("conn", "mx.remote.test", 2)
        .await
        .expect("a second lease");
    assert!(
        a.acquire("conn", "mx.remote.test", 2).await.is_none(),
        "the limit holds across pods"
    );
    assert!(
        b.acquire("conn", "mx.other.test", 2).await.is_some(),
        "another host is not blocked"
    );
    b.release(second).await;
    let third = a
        .acquire("conn", "mx.remote.test", 2)
        .await
        .expect("freed by the other pod");
    a.release(first).await;
    a.release(third).await;
    // A holder that dies: its lease expires.
    let short = Leases::new(&redis(&prefix), Duration::from_millis(300)).unwrap();
    let _lost = short
        .acquire("conn", "mx.dying.test", 1)
        .await
        .expect("a lease");
    assert!(short.acquire("conn", "mx.dying.test", 1).await.is_none());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        short.acquire("conn", "mx.dying.test", 1).await.is_some(),
        "expired leases free their slot"
    );
    cleanup(&prefix);
}

/// A destination's hold (it said to slow down) set by one replica is seen
/// by another, with what is left of it, and ends by itself; without
/// Redis, the process holds alone.
#[tokio::test]
async fn a_hold_is_shared_and_expires() {
    let prefix = format!("correu-test-hold-{}", std::process::id());
    let a = RateLimiter::new(&redis(&prefix)).unwrap();
    let b = RateLimiter::new(&redis(&prefix)).unwrap();
    assert_eq!(b.held("backoff", "site:google").await, None);
    a.hold("backoff", "site:google", Duration::from_millis(1500))
        .await;
    let left = b.held("backoff", "site:google").await.expect("held");
    assert!(left > Duration::from_millis(500) && left <= Duration::from_millis(1500));
    assert_eq!(b.held("backoff", "site:other").await, None, "others go on");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(b.held("backoff", "site:google").await, None, "it ends");

    let local = RateLimiter::new(&RedisConfig::default()).unwrap();
    local
        .hold("backoff", "mx.example", Duration::from_secs(60))
        .await;
    assert!(local.held("backoff", "mx.example").await.is_some());
    cleanup(&prefix);
}
