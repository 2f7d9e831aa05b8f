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
//! - [`run`]: the consumer loop, bounded by `delivery.concurrency`.
//! - [`outcome`]: delivered / temporary / permanent, decided in one place.
//! - [`route`]: routes, MX lookup, addresses.
//! - [`client`]: the SMTP client.
#![forbid(unsafe_code)]

pub mod client;
pub mod outcome;
pub mod route;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_proto::v1::{DeliverRequest, QueuedMessage};
use correu_queue::{Delivery, Next, Queue, Schedule};
use correu_runtime::Config;
use correu_storage::client::Client as StorageClient;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::client::{Client, Timeouts, Transaction};
use crate::outcome::Outcome;
use crate::route::Router;

/// Time in-flight deliveries get to finish when the service stops; what is
/// not settled by then goes back to the queue and is delivered again.
const DRAIN: Duration = Duration::from_secs(30);

/// A message on which the delivery code panicked this many times is parked.
const MAX_PANICS: u32 = 3;

pub struct Deliverer {
    index: Option<correu_queue::index::DeferredIndex>,
    /// Panics per queue id in this process (for parking poison messages).
    panics: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    attempt_timeout: Duration,
    hostname: String,
    domains: Vec<String>,
    storage: StorageClient,
    storage_timeout: Duration,
    router: Router,
    schedule: Schedule,
    connect_timeout: Duration,
    timeouts: Timeouts,
}

impl Deliverer {
    pub fn new(cfg: &Config, storage: StorageClient) -> anyhow::Result<Self> {
        let resolver = route::resolver(cfg.delivery.dns_server)?;
        Ok(Deliverer {
            index: correu_queue::index::DeferredIndex::new(&cfg.redis)?,
            panics: std::sync::Mutex::new(std::collections::HashMap::new()),
            attempt_timeout: cfg.delivery.attempt_timeout.get(),
            hostname: cfg.hostname.clone(),
            domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
            storage,
            storage_timeout: cfg.storage.request_timeout.get(),
            router: Router::new(resolver, &cfg.delivery.routes, cfg.delivery.mx_port),
            schedule: Schedule {
                delays: cfg.queue.retry_delays.iter().map(|d| d.get()).collect(),
                max_age: cfg.queue.max_age.get(),
            },
            connect_timeout: cfg.delivery.connect_timeout.get(),
            timeouts: Timeouts {
                command: cfg.delivery.command_timeout.get(),
                data: cfg.delivery.data_timeout.get(),
            },
        })
    }

    fn is_local(&self, address: &str) -> bool {
        address
            .rsplit_once('@')
            .is_some_and(|(_, d)| self.domains.iter().any(|l| l.eq_ignore_ascii_case(d)))
    }

    fn panics(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        // A counter map: consistent even if a holder panicked.
        self.panics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers one queued message and settles it.
    pub async fn handle(&self, delivery: Delivery) {
        let Some(msg) = delivery.message.clone() else {
            tracing::error!(
                bytes = delivery.raw.len(),
                "undecodable queue message; parking it"
            );
            if let Err(e) = delivery.park("envelope does not decode").await {
                tracing::error!(error = %e, "cannot park undecodable message");
            }
            return;
        };
        let panicked = self.panics().get(&msg.queue_id).copied().unwrap_or(0);
        if panicked >= MAX_PANICS {
            tracing::error!(queue_id = %msg.queue_id, panicked, "delivery keeps failing on this message; parking it");
            let why = format!("delivery panicked on it {panicked} times");
            match delivery.park(&why).await {
                Ok(()) => {
                    self.panics().remove(&msg.queue_id);
                }
                Err(e) => {
                    tracing::error!(queue_id = %msg.queue_id, error = %e, "cannot park message")
                }
            }
            return;
        }
        let span = tracing::info_span!("delivery.message", queue_id = %msg.queue_id, attempt = msg.attempt + 1);
        let work = std::panic::AssertUnwindSafe(self.deliver_all(&msg).instrument(span));
        match futures_util::FutureExt::catch_unwind(work).await {
            Ok(outcomes) => {
                self.panics().remove(&msg.queue_id);
                self.settle(delivery, msg, outcomes).await;
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

    /// Every recipient's outcome, in the order of `msg.recipients`. Work
    /// not finished within `delivery.attempt_timeout` is a temporary failure.
    async fn deliver_all(&self, msg: &QueuedMessage) -> Vec<Outcome> {
        let deadline = tokio::time::Instant::now() + self.attempt_timeout;
        let late = || {
            Outcome::Temporary(format!(
                "4.4.7 attempt took longer than {:?}",
                self.attempt_timeout
            ))
        };
        let mut outcomes = vec![Outcome::Temporary("not attempted".into()); msg.recipients.len()];
        // Remote recipients grouped by domain: one connection per domain.
        let mut remote: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in msg.recipients.iter().enumerate() {
            if self.is_local(&r.address) {
                outcomes[i] =
                    tokio::time::timeout_at(deadline, self.deliver_local(msg, &r.address))
                        .await
                        .unwrap_or_else(|_| late());
            } else {
                let domain = r
                    .address
                    .rsplit_once('@')
                    .map_or("", |(_, d)| d)
                    .to_lowercase();
                remote.entry(domain).or_default().push(i);
            }
        }
        for (domain, idx) in remote {
            let rcpts: Vec<String> = idx
                .iter()
                .map(|&i| msg.recipients[i].address.clone())
                .collect();
            let got = tokio::time::timeout_at(deadline, self.deliver_remote(msg, &domain, &rcpts))
                .await
                .unwrap_or_else(|_| vec![late(); rcpts.len()]);
            for (k, &i) in idx.iter().enumerate() {
                outcomes[i] = got[k].clone();
            }
        }
        outcomes
    }

    async fn deliver_local(&self, msg: &QueuedMessage, rcpt: &str) -> Outcome {
        let req = DeliverRequest {
            queue_id: msg.queue_id.clone(),
            sender: msg.sender.clone(),
            recipient: rcpt.to_string(),
            content: msg.content.clone(),
            received_at_unix_micros: msg.received_at_unix_micros,
        };
        let mut client = self.storage.clone();
        let span = tracing::info_span!("storage.deliver", queue_id = %msg.queue_id);
        match timeout(self.storage_timeout, client.deliver(req))
            .instrument(span)
            .await
        {
            Ok(Ok(_)) => Outcome::Delivered,
            Ok(Err(status)) => outcome::from_status(&status),
            Err(_) => Outcome::Temporary(format!(
                "storage did not answer within {:?}",
                self.storage_timeout
            )),
        }
    }

    /// Tries the domain's hops in order until one gives every recipient an
    /// answer.
    async fn deliver_remote(
        &self,
        msg: &QueuedMessage,
        domain: &str,
        rcpts: &[String],
    ) -> Vec<Outcome> {
        let hops = match self.router.hops(domain).await {
            Ok(h) => h,
            Err(o) => return vec![o; rcpts.len()],
        };
        let mut last = Outcome::Temporary(format!("4.4.4 no host to deliver to for {domain}"));
        for hop in hops {
            let addrs = match self.router.addresses(&hop).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    last = Outcome::Temporary(format!("4.4.4 {} has no address", hop.host));
                    continue;
                }
                Err(e) => {
                    last = Outcome::Temporary(format!("4.4.4 {e}"));
                    continue;
                }
            };
            for addr in addrs {
                let span = tracing::info_span!("delivery.attempt", queue_id = %msg.queue_id, mx = %hop.host, %addr);
                match self
                    .try_host(msg, &hop.host, addr, rcpts)
                    .instrument(span)
                    .await
                {
                    Ok(outcomes) => return outcomes,
                    Err(e) => {
                        tracing::info!(queue_id = %msg.queue_id, mx = %hop.host, %addr, error = %e, "next hop failed; trying the next");
                        last = Outcome::Temporary(format!("4.4.1 {} ({addr}): {e}", hop.host));
                    }
                }
            }
        }
        vec![last; rcpts.len()]
    }

    async fn try_host(
        &self,
        msg: &QueuedMessage,
        host: &str,
        addr: std::net::SocketAddr,
        rcpts: &[String],
    ) -> Result<Vec<Outcome>, client::SessionError> {
        let stream = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(client::SessionError::Timeout(self.connect_timeout)),
            Ok(r) => r?,
        };
        stream.set_nodelay(true)?;
        let mut c = Client::new(stream, host, self.timeouts);
        c.hello(&self.hostname).await?;
        let outcomes = c
            .deliver(&Transaction {
                sender: &msg.sender,
                recipients: rcpts,
                content: &msg.content,
            })
            .await?;
        c.quit().await;
        Ok(outcomes)
    }

    /// Acks, retries what is pending, or gives up past the maximum age.
    async fn settle(&self, delivery: Delivery, msg: QueuedMessage, outcomes: Vec<Outcome>) {
        let mut pending = Vec::new();
        let mut last_error = String::new();
        for (r, o) in msg.recipients.iter().zip(&outcomes) {
            match o {
                Outcome::Delivered => {
                    tracing::info!(queue_id = %msg.queue_id, recipient = %r.address, attempt = msg.attempt + 1, "delivered");
                }
                Outcome::Permanent(why) => {
                    // DSN bounces come with the delivery issue; until then the
                    // failure is logged for the operator.
                    tracing::warn!(queue_id = %msg.queue_id, recipient = %r.address, reason = %why, "delivery failed permanently");
                }
                Outcome::Temporary(why) => {
                    tracing::info!(queue_id = %msg.queue_id, recipient = %r.address, reason = %why, "delivery deferred");
                    last_error = why.clone();
                    pending.push(r.clone());
                }
            }
        }
        let id = msg.queue_id.clone();
        let was_deferred = msg.attempt > 0;
        let result = if pending.is_empty() {
            delivery.ack().await
        } else {
            let attempts = msg.attempt + 1;
            let age = age_of(msg.received_at_unix_micros);
            match self.schedule.next(attempts, age) {
                Next::RetryIn { tier, delay } => {
                    tracing::info!(queue_id = %id, attempts, retry_in = ?delay, pending = pending.len(), "retry scheduled");
                    let updated = QueuedMessage {
                        recipients: pending,
                        attempt: attempts,
                        last_error,
                        ..msg
                    };
                    let r = delivery.retry(&updated, tier, delay).await;
                    if r.is_ok()
                        && let Some(index) = &self.index
                    {
                        let entry = correu_queue::admin::Deferred::from_message(
                            &updated,
                            correu_queue::index::due_in(delay),
                        );
                        if let Err(e) = index.record(&entry, delay).await {
                            tracing::debug!(queue_id = %id, error = %e, "deferred index not updated");
                        }
                    }
                    return self.log_settle(&id, r);
                }
                Next::GiveUp => {
                    tracing::warn!(queue_id = %id, attempts, ?age, "maximum age reached; giving up");
                    delivery.ack().await
                }
            }
        };
        if result.is_ok()
            && was_deferred
            && let Some(index) = &self.index
            && let Err(e) = index.remove(&id).await
        {
            tracing::debug!(queue_id = %id, error = %e, "deferred index not updated");
        }
        self.log_settle(&id, result);
    }

    fn log_settle(&self, id: &str, result: Result<(), correu_queue::QueueError>) {
        if let Err(e) = result {
            tracing::error!(queue_id = %id, error = %e, "cannot settle message; it will be delivered again");
        }
    }
}

fn age_of(received_at_unix_micros: i64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64;
    Duration::from_micros(now.saturating_sub(received_at_unix_micros).max(0) as u64)
}

/// Consumes `queue` and delivers until `shutdown`; then waits up to 30 s for
/// deliveries in progress (what does not finish is redelivered later).
pub async fn run(
    cfg: &Config,
    queue: Queue,
    storage: StorageClient,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let deliverer = Arc::new(Deliverer::new(cfg, storage)?);
    let mut consumer = queue.consumer();
    let slots = Arc::new(Semaphore::new(cfg.delivery.concurrency));
    let tracker = TaskTracker::new();
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
    tracing::info!(in_flight = tracker.len(), "delivery stopping");
    if timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "deliveries still running at the deadline; they will be redelivered"
        );
    }
    Ok(())
}

/// The delivery service on its own: RabbitMQ (unless configured otherwise)
/// and storage at `storage.endpoint`.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let queue = correu_queue::open_for_service(&cfg.queue).await?;
    let storage = correu_storage::client::connect(&cfg.storage, &cfg.storage.endpoint)?;
    run(&cfg, queue, storage, shutdown).await
}
