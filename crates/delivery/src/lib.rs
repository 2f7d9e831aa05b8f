//! The delivery service: takes messages off the queue and delivers each
//! recipient, to a local mailbox through storage's gRPC `Deliver`, or to the
//! next hop by SMTP.
//!
//! A message is settled only once every recipient's outcome is durable:
//! delivered, republished to a retry tier with the recipients still pending,
//! or given up. Storage is idempotent on (queue id, recipient), so a
//! message redelivered after a crash makes no second copy.
//!
//! # Layout
//! - this file: [`Deliverer`], [`run`] (the consumer loop, bounded by
//!   `delivery.concurrency`) and what happens to one message
//!   ([`Deliverer::handle`]: attempt, then settle; poison messages parked).
//! - `attempt`: one attempt: local recipients through storage, remote
//!   domains through their hops ([`route`]: routes, MX lookup, addresses),
//!   with TLS ([`tls`], [`mta_sts`]) and DKIM ([`dkim`]).
//! - [`pool`]: kept connections and the leases that count them per host.
//! - [`client`]: the SMTP client, a deadline per phase.
//! - [`outcome`]: delivered / temporary / permanent, for replies, storage
//!   errors and failed sessions, decided in one place.
//! - [`settle`]: [`settle::plan`], the pure decision after an attempt
//!   (retry tier, bounce, delay warning, NOTIFY), and its executor.
//! - [`dsn`]: bounces and success reports (RFC 3464).
//! - [`suppression`]: recipients that bounced hard, refused at once.
//! - `settle` also writes the delivery log line and publishes the
//!   delivery events (proto/correu/v1/events.proto).
#![forbid(unsafe_code)]

mod attempt;
pub mod client;
pub mod dane;
pub mod dkim;
pub mod dsn;
pub mod http;
pub mod metrics;
pub mod mta_sts;
pub mod outcome;
pub mod pool;
pub mod route;
pub mod settle;
pub mod shaping;
pub mod suppression;
pub mod tls;
pub mod tlsrpt;

use std::sync::Arc;
use std::time::Duration;

use correu_queue::{Delivery, Queue, Schedule};
use correu_runtime::Config;
use correu_runtime::config::OutboundTls;
use correu_storage_client::Client as StorageClient;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::client::Timeouts;
use crate::route::Router;

/// Time in-flight deliveries get to finish when the service stops; what is
/// not settled by then goes back to the queue and is delivered again.
const DRAIN: Duration = Duration::from_secs(30);

/// A message on which the delivery code panicked this many times is parked.
const MAX_PANICS: u32 = 3;

pub struct Deliverer {
    rules: settle::Rules,
    lease_freed: tokio::sync::Notify,
    queue: Queue,
    pool: pool::Pool,
    dkim: Arc<dkim::Dkim>,
    leases: correu_runtime::limits::Leases,
    rates: correu_runtime::limits::RateLimiter,
    /// Limits per destination (`delivery.shaping`, else per host).
    shaping: shaping::Shaping,
    /// TLS reports (RFC 8460), when `delivery.tls_reports.enabled`.
    tls_reports: Option<Arc<tlsrpt::TlsReports>>,
    domain_rate: correu_runtime::config::Rate,
    /// TLS for hops without a route of their own, and the connectors.
    tls_default: OutboundTls,
    opportunistic: tls::TlsPolicy,
    required: tls::TlsPolicy,
    mta_sts: Option<mta_sts::MtaSts>,
    index: Option<correu_queue::index::DeferredIndex>,
    suppression: Option<suppression::Suppressions>,
    /// Publish a `DeliveryEvent` per recipient and attempt (`events.enabled`).
    events: bool,
    /// Panics per queue id in this process (for parking poison messages).
    panics: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    attempt_timeout: Duration,
    hostname: String,
    domains: Vec<String>,
    /// `telemetry.domains`: destinations labelled by name in metrics.
    metric_domains: Vec<String>,
    storage: StorageClient,
    storage_timeout: Duration,
    router: Router,
    schedule: Schedule,
    timeouts: Timeouts,
}

impl Deliverer {
    pub fn new(cfg: &Config, queue: Queue, storage: StorageClient) -> anyhow::Result<Self> {
        let resolver = correu_runtime::dns::resolver(&cfg.dns)?;
        let verified = tls::verified(cfg.delivery.tls_ca_file.as_deref())?;
        // One Redis pool for leases, rates and the deferred index.
        let redis = correu_runtime::redis::pool(&cfg.redis)?;
        // Without Redis the list lives in the spool: one process's. Beside
        // RabbitMQ, delivery processes are many and may have no writable
        // spool: the list is off rather than per pod.
        let suppression = match (&queue, &redis) {
            (Queue::Amqp(_), None) if cfg.delivery.suppression.enabled => {
                tracing::warn!(
                    "delivery.suppression is on but redis.url is not set: the suppression list is shared through Redis when delivery runs beside RabbitMQ; it is off"
                );
                None
            }
            _ => suppression::Suppressions::open(cfg, redis.clone(), false),
        };
        Ok(Deliverer {
            rules: settle::Rules {
                bounces: cfg.delivery.bounces,
                delay_warning: cfg.delivery.delay_warning.get(),
            },
            lease_freed: tokio::sync::Notify::new(),
            queue,
            pool: pool::Pool::new(),
            dkim: Arc::new(dkim::Dkim::new(&cfg.delivery.dkim)?),
            // A lease outlives no attempt: it expires with the attempt deadline.
            leases: correu_runtime::limits::Leases::with_pool(
                &cfg.redis,
                redis.clone(),
                cfg.delivery.attempt_timeout.get(),
            ),
            rates: correu_runtime::limits::RateLimiter::with_pool(&cfg.redis, redis.clone()),
            shaping: shaping::Shaping::new(&cfg.delivery),
            tls_reports: tlsrpt::TlsReports::open(cfg, redis.clone(), false).map(Arc::new),
            domain_rate: cfg.delivery.domain_rate,
            tls_default: cfg.delivery.tls,
            opportunistic: tls::TlsPolicy::Opportunistic(tls::opportunistic()?),
            mta_sts: cfg.delivery.mta_sts.then(|| {
                mta_sts::MtaSts::new(
                    resolver.clone(),
                    verified.clone(),
                    cfg.delivery.mta_sts_port,
                    cfg.delivery.timeouts.connect.get(),
                )
            }),
            required: tls::TlsPolicy::Required(verified),
            suppression,
            events: cfg.publishes_events(),
            index: correu_queue::index::DeferredIndex::with_pool(&cfg.redis, redis),
            panics: std::sync::Mutex::new(std::collections::HashMap::new()),
            attempt_timeout: cfg.delivery.attempt_timeout.get(),
            hostname: cfg.hostname.clone(),
            domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
            metric_domains: cfg.telemetry.domains.clone(),
            storage,
            storage_timeout: cfg.storage.request_timeout.get(),
            // DANE needs DNSSEC-validated answers for MX, addresses and TLSA.
            router: if cfg.delivery.uses_dane() {
                Router::new(
                    correu_runtime::dns::validating_resolver(&cfg.dns)?,
                    true,
                    &cfg.delivery.routes,
                    cfg.delivery.mx_port,
                )
            } else {
                Router::new(resolver, false, &cfg.delivery.routes, cfg.delivery.mx_port)
            },
            schedule: Schedule::new(
                cfg.queue.retry_delays.iter().map(|d| d.get()).collect(),
                cfg.queue.max_age.get(),
            ),
            timeouts: Timeouts::from_config(&cfg.delivery.timeouts),
        })
    }

    fn is_local(&self, address: &str) -> bool {
        address
            .rsplit_once('@')
            .is_some_and(|(_, d)| self.domains.iter().any(|l| l.eq_ignore_ascii_case(d)))
    }

    fn panics(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        // A counter map: consistent even if a holder panicked.
        correu_runtime::sync::lock(&self.panics)
    }

    /// Delivers one queued message and settles it.
    pub async fn handle(&self, delivery: Delivery) {
        let Some(msg) = delivery.message.clone() else {
            tracing::error!(
                bytes = delivery.raw.len(),
                "undecodable queue message; parking it"
            );
            park(delivery, "", "undecodable", "envelope does not decode").await;
            return;
        };
        // An envelope that decodes but names nobody, or carries no message,
        // can never be delivered: it is kept for an operator, never dropped
        // in silence.
        let unusable = if msg.recipients.is_empty() {
            Some(("no_recipients", "the envelope has no recipients"))
        } else if msg.content.is_empty() {
            Some(("empty", "the message is empty"))
        } else {
            None
        };
        if let Some((label, why)) = unusable {
            tracing::error!(queue_id = %msg.queue_id, reason = why, "undeliverable queue message; parking it");
            park(delivery, &msg.queue_id, label, why).await;
            return;
        }
        let panicked = self.panics().get(&msg.queue_id).copied().unwrap_or(0);
        if panicked >= MAX_PANICS {
            tracing::error!(queue_id = %msg.queue_id, panicked, "delivery keeps failing on this message; parking it");
            let why = format!("delivery panicked on it {panicked} times");
            if park(delivery, &msg.queue_id, "panics", &why).await {
                self.panics().remove(&msg.queue_id);
            }
            return;
        }
        // The message's trace goes on: ingress's publish is the parent,
        // on every attempt (retries republish the same traceparent).
        let span = tracing::info_span!(
            parent: None,
            "delivery.message",
            queue_id = %msg.queue_id,
            attempt = i64::from(msg.attempt) + 1,
            trace_id = tracing::field::Empty,
            "otel.kind" = "consumer",
            "messaging.system" = self.queue.system(),
            "messaging.operation.type" = "process",
            "messaging.operation.name" = "consume",
            "messaging.destination.name" = "correu.work",
            "messaging.message.id" = %msg.queue_id,
            "otel.status_description" = tracing::field::Empty,
        );
        if !msg.traceparent.is_empty() {
            let headers = std::collections::HashMap::from([(
                "traceparent".to_string(),
                msg.traceparent.clone(),
            )]);
            correu_runtime::telemetry::extract_into(&span, &headers);
        }
        if let Some(t) = correu_runtime::telemetry::trace_id(&span) {
            span.record("trace_id", t.as_str());
        }
        let work = std::panic::AssertUnwindSafe(self.deliver_all(&msg).instrument(span.clone()));
        match futures_util::FutureExt::catch_unwind(work).await {
            Ok(attempt) => {
                self.panics().remove(&msg.queue_id);
                self.settle(delivery, msg, attempt).instrument(span).await;
            }
            Err(_) => {
                let n = {
                    let mut p = self.panics();
                    let n = p.entry(msg.queue_id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                tracing::error!(queue_id = %msg.queue_id, panics = n, "delivery panicked; the message goes back to the queue");
                if let Err(e) = delivery.release().await {
                    tracing::error!(queue_id = %msg.queue_id, error = %e, "cannot give the message back; it returns on reconnection");
                }
            }
        }
    }
}

/// Parks `delivery` with `why`, counted under `label`; whether it worked.
async fn park(delivery: Delivery, queue_id: &str, label: &'static str, why: &str) -> bool {
    match delivery.park(why).await {
        Ok(()) => {
            metrics::METRICS
                .parked
                .add(1, &[opentelemetry::KeyValue::new("reason", label)]);
            true
        }
        Err(e) => {
            tracing::error!(%queue_id, error = %e, "cannot park message; it stays in the queue");
            false
        }
    }
}

/// Consumes `queue` and delivers until `shutdown`; then waits up to 30 s for
/// deliveries in progress (what does not finish is redelivered later).
pub async fn run(
    cfg: &Config,
    queue: Queue,
    storage: StorageClient,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::init();
    let deliverer = Arc::new(Deliverer::new(cfg, queue.clone(), storage)?);
    if let Queue::Amqp(q) = &queue
        && !cfg.webhook.urls.is_empty()
    {
        q.keep_events();
    }
    // Yesterday's TLS reports, once a day.
    let reports = match &deliverer.tls_reports {
        Some(r) => {
            let (r, queue, stop) = (r.clone(), queue.clone(), shutdown.clone());
            let resolver = correu_runtime::dns::resolver(&cfg.dns)?;
            let https = tls::verified(cfg.delivery.tls_ca_file.as_deref())?;
            Some(tokio::spawn(async move {
                r.daily(queue, resolver, https, stop).await
            }))
        }
        None => None,
    };
    let mut consumer = queue.consumer();
    let slots = Arc::new(Semaphore::new(cfg.delivery.concurrency));
    let tracker = TaskTracker::new();
    // Idle connections are closed, and their leases given back, within a
    // second of passing `connection_idle`.
    let sweeper = tokio::spawn({
        let d = deliverer.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.close_kept(false).await;
            }
        }
    });
    // Queue depths for the correu.queue.depth gauge, from the broker.
    let depths = tokio::spawn({
        let queue = queue.clone();
        async move {
            loop {
                if let Ok(counts) = queue.counts().await {
                    correu_queue::metrics::record_depths(&counts);
                }
                tokio::time::sleep(Duration::from_secs(15)).await;
            }
        }
    });
    tracing::info!(concurrency = cfg.delivery.concurrency, "delivery consuming");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Some(delivery) = consumer.next(&shutdown).await else {
            break;
        };
        let d = deliverer.clone();
        tracker.spawn(async move {
            d.handle(delivery).await;
            drop(permit);
        });
    }
    tracker.close();
    sweeper.abort();
    depths.abort();
    if let Some(r) = reports {
        r.abort();
    }
    tracing::info!(in_flight = tracker.len(), "delivery stopping");
    if timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "deliveries still running at the deadline; they will be redelivered"
        );
    }
    deliverer.close_kept(true).await;
    Ok(())
}

/// The delivery service on its own: RabbitMQ (unless configured otherwise)
/// and storage at `storage.endpoint`.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let queue = correu_queue::open_for_service(&cfg.queue, &cfg.redis).await?;
    let storage = correu_storage_client::connect(&cfg.storage, &cfg.storage.endpoint)?;
    let health = correu_runtime::health::Health::new(shutdown.clone())
        .check("queue", correu_queue::ready_check(queue.clone()))
        .advisory(
            "storage",
            correu_storage_client::ready_check(storage.clone()),
        );
    let (probes, _) = correu_runtime::health::start(&cfg, health).await?;
    let result = run(&cfg, queue, storage, shutdown).await;
    probes.cancel();
    result
}
