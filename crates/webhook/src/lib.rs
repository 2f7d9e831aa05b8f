//! The webhook service (`correu webhook`): every delivery event
//! (`correu.v1.DeliveryEvent`, published by delivery) posted as JSON to
//! each of `webhook.urls`, signed with HMAC-SHA256.
//!
//! - Source: the quorum queue `<queue.prefix>.webhook`, bound to every
//!   event on the exchange `<queue.prefix>.events` (declared by delivery
//!   too, so events published before this service first starts wait for
//!   it); for `correu serve` with the embedded spool, `<spool>/events`.
//! - At least once: an event is acknowledged (or its file deleted) only
//!   after every URL answered 2xx; a URL that fails is retried with
//!   backoff (1 s doubling to 5 min) for as long as it takes, holding
//!   one of `webhook.concurrency` slots.
//! - Without visible duplicates: each event has an id (the same when
//!   delivery publishes an outcome twice), sent as `Correu-Event-Id`; with
//!   Redis, a URL that took an event is remembered for 7 days
//!   (`<prefix>:webhook:<url hash>:<id>`), so an event redelivered after a
//!   crash is not posted to it again.

pub mod event;
pub mod metrics;
pub mod post;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use correu_proto::v1::DeliveryEvent;
use correu_queue::Queue;
use correu_runtime::Config;
use correu_runtime::backoff::Backoff;
use deadpool_redis::Pool;
use deadpool_redis::redis::AsyncCommands;
use futures_util::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::METRICS;
use crate::post::Poster;
use correu_delivery::http::{PostError, Target};

/// How long a URL that took an event is remembered (Redis).
const REMEMBER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Retry delays of a failing URL.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often `correu serve` looks for new event files.
const POLL: Duration = Duration::from_millis(250);

/// What posts events: the URLs, the signer, and what was posted.
pub struct Webhook {
    targets: Vec<Target>,
    poster: Poster,
    /// Empty for every outcome.
    outcomes: Vec<String>,
    concurrency: usize,
    redis: Option<(Pool, String)>,
}

impl Webhook {
    /// From `[webhook]`; reads the secret file and the extra CA now, so a
    /// bad one stops the start.
    pub fn new(cfg: &Config) -> anyhow::Result<Webhook> {
        let w = &cfg.webhook;
        let targets = w
            .urls
            .iter()
            .map(|u| Target::parse(u).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("webhook.urls")?;
        let secret = match &w.secret_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("webhook.secret_file: {}", path.display()))?;
                let line = text.lines().next().unwrap_or("").trim();
                anyhow::ensure!(
                    !line.is_empty(),
                    "webhook.secret_file: {} has an empty first line",
                    path.display()
                );
                Some(line.as_bytes().to_vec())
            }
            None => None,
        };
        let tls = correu_delivery::tls::verified(w.tls_ca_file.as_deref())
            .context("webhook.tls_ca_file")?;
        let redis = correu_runtime::redis::pool(&cfg.redis)?.map(|p| (p, cfg.redis.prefix.clone()));
        Ok(Webhook {
            targets,
            poster: Poster::new(tls, secret, w.timeout.get()),
            outcomes: w.outcomes.clone(),
            concurrency: w.concurrency,
            redis,
        })
    }

    /// Posts one encoded event to every URL that has not taken it yet.
    /// `true` when all have (or the event is not one to post); `false`
    /// when `stop` came first.
    pub async fn handle(&self, payload: &[u8], stop: &CancellationToken) -> bool {
        let event = match DeliveryEvent::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                // Not an event: retrying cannot help, and holding it would
                // hold every event behind it.
                tracing::error!(error = %e, bytes = payload.len(), "undecodable delivery event dropped");
                METRICS.dropped.add(1, &[]);
                return true;
            }
        };
        let outcome = event::outcome_name(event.outcome).unwrap_or("unknown");
        if !self.outcomes.is_empty() && !self.outcomes.iter().any(|o| o == outcome) {
            return true;
        }
        let body = Bytes::from(event::to_json(&event));
        // Each URL on its own: one that is down holds back no other.
        let posts = self
            .targets
            .iter()
            .map(|t| self.post_until_taken(t, &event, outcome, &body, stop));
        futures_util::future::join_all(posts)
            .await
            .into_iter()
            .all(|done| done)
    }

    /// Posts to one URL until it answers 2xx (`true`), refuses the event
    /// for good (a 4xx other than 408 and 429: logged, counted, `true`), or
    /// `stop` comes (`false`).
    async fn post_until_taken(
        &self,
        t: &Target,
        event: &DeliveryEvent,
        outcome: &'static str,
        body: &Bytes,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            // Checked on every try: another process may have posted it
            // meanwhile (a redelivery after this one's channel closed).
            if self.posted(t, &event.id).await {
                tracing::info!(url = %t.url, event_id = %event.id, "event already posted to this URL; not posted again");
                return true;
            }
            let started = tokio::time::Instant::now();
            let result = self.poster.post(t, &event.id, body).await;
            let secs = started.elapsed().as_secs_f64();
            match result {
                Ok(()) => {
                    METRICS.record(outcome, "posted", secs);
                    tracing::info!(
                        url = %t.url,
                        event_id = %event.id,
                        event = outcome,
                        queue_id = %event.queue_id,
                        "event posted"
                    );
                    self.remember(t, &event.id).await;
                    return true;
                }
                Err(PostError::Status(code))
                    if code.is_client_error()
                        && code != http::StatusCode::REQUEST_TIMEOUT
                        && code != http::StatusCode::TOO_MANY_REQUESTS =>
                {
                    METRICS.record(outcome, "refused", secs);
                    tracing::error!(
                        url = %t.url,
                        event_id = %event.id,
                        status = code.as_u16(),
                        "the webhook refused the event for good; not posted again"
                    );
                    return true;
                }
                Err(e) => {
                    METRICS.record(outcome, "failed", secs);
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(
                        url = %t.url,
                        event_id = %event.id,
                        error = %e,
                        retry_in = ?delay,
                        "webhook post failed"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn key(prefix: &str, t: &Target, id: &str) -> String {
        format!("{prefix}:webhook:{}:{id}", t.key)
    }

    /// Whether `t` already took event `id` (Redis; without it, or when it
    /// cannot say, the event is posted: at least once).
    async fn posted(&self, t: &Target, id: &str) -> bool {
        let Some((pool, prefix)) = &self.redis else {
            return false;
        };
        let check = async {
            let mut c = pool.get().await.ok()?;
            c.exists::<_, bool>(Self::key(prefix, t, id)).await.ok()
        };
        tokio::time::timeout(Duration::from_secs(2), check)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    async fn remember(&self, t: &Target, id: &str) {
        let Some((pool, prefix)) = &self.redis else {
            return;
        };
        let set = async {
            let mut c = pool.get().await.map_err(|e| e.to_string())?;
            c.set_ex::<_, _, ()>(Self::key(prefix, t, id), 1u8, REMEMBER.as_secs())
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remember a posted event in Redis"),
            Err(_) => tracing::warn!("cannot remember a posted event in Redis: timed out"),
        }
    }
}

/// Posts the events of `queue` until `shutdown`: RabbitMQ's webhook queue,
/// or the spool's event files.
pub async fn run(hook: Arc<Webhook>, queue: Queue, shutdown: CancellationToken) {
    metrics::init();
    tracing::info!(
        urls = hook.targets.len(),
        signed = hook.poster.signs(),
        "webhook running"
    );
    match queue {
        Queue::Amqp(q) => from_amqp(hook, q, shutdown).await,
        Queue::Spool(s) => {
            from_spool(hook, correu_queue::events::spool_dir(s.root()), shutdown).await
        }
    }
}

/// The webhook service on its own: RabbitMQ.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let hook = Arc::new(Webhook::new(&cfg)?);
    let queue = correu_queue::open_for_service(&cfg.queue, &cfg.redis).await?;
    let health = correu_runtime::health::Health::new(shutdown.clone())
        .check("queue", correu_queue::ready_check(queue.clone()));
    let (probes, _) = correu_runtime::health::start(&cfg, health).await?;
    run(hook, queue, shutdown).await;
    probes.cancel();
    Ok(())
}

async fn from_amqp(
    hook: Arc<Webhook>,
    q: Arc<correu_queue::amqp::AmqpQueue>,
    stop: CancellationToken,
) {
    use lapin::options::{BasicAckOptions, BasicNackOptions};
    let prefetch = u16::try_from(hook.concurrency).unwrap_or(u16::MAX);
    let tracker = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    // The tasks of one channel stop with it: its unacknowledged events go
    // back to the broker (RabbitMQ closes a consumer that holds one past
    // its consumer_timeout), and the next channel gets them again.
    let mut channel_stop = stop.child_token();
    'connect: while !stop.is_cancelled() {
        channel_stop.cancel();
        channel_stop = stop.child_token();
        let mut consumer = match q.consume_events(prefetch).await {
            Ok(c) => {
                backoff.reset();
                c
            }
            Err(e) => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(error = %e, retry_in = ?delay, "cannot consume events from RabbitMQ");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => break 'connect,
                item = consumer.next() => item,
            };
            let d = match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "event consumer failed; reconnecting");
                    continue 'connect;
                }
                None => {
                    tracing::warn!("event consumer closed; reconnecting");
                    continue 'connect;
                }
            };
            // The broker hands out at most `prefetch` unacknowledged
            // events, which bounds the tasks.
            let (hook, stop) = (hook.clone(), channel_stop.clone());
            tracker.spawn(async move {
                let settled = if hook.handle(&d.data, &stop).await {
                    d.acker.ack(BasicAckOptions::default()).await
                } else {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    d.acker.nack(requeue).await
                };
                // A lost channel requeues the event by itself; the URLs
                // that took it are remembered.
                if let Err(e) = settled {
                    tracing::warn!(error = %e, "cannot settle an event; the broker will redeliver it");
                }
            });
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn from_spool(hook: Arc<Webhook>, dir: std::path::PathBuf, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let pending = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || correu_queue::events::pending(&dir)).await
        };
        let files = match pending {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list event files");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing event files failed");
                Vec::new()
            }
        };
        futures_util::stream::iter(files)
            .for_each_concurrent(hook.concurrency, |path| {
                let (hook, stop) = (hook.clone(), stop.clone());
                async move {
                    let payload = match tokio::fs::read(&path).await {
                        Ok(p) => p,
                        // Taken by another reader.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "cannot read an event file");
                            return;
                        }
                    };
                    if hook.handle(&payload, &stop).await
                        && let Err(e) = tokio::fs::remove_file(&path).await
                    {
                        tracing::warn!(file = %path.display(), error = %e, "cannot remove a posted event file");
                    }
                }
            })
            .await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}
