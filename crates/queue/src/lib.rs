//! Correu's queue between ingress and delivery, behind one type with two
//! backends:
//!
//! - [`amqp`]: RabbitMQ through lapin, for the services on their own. A
//!   publish is confirmed by the broker before it returns; delivery consumes
//!   with manual acks and a bounded prefetch; retries wait in TTL queues that
//!   dead-letter back to the work exchange, so no consumer holds a message.
//! - [`spool`]: a spool directory for `correu serve`: a message is a file,
//!   fsynced and renamed into place before the publish returns.
//!
//! Either way a publish that returned `Ok` is durable, and that is what lets
//! ingress answer `250`.
//!
//! # Layout
//! - [`fate`]: withdrawing a message whose confirm never came.
//! - [`id`]: queue ids. [`schedule`]: the retry schedule, a pure function.
//! - [`admin`]: counts, the deferred list and operator actions;
//!   [`index`]: the informational Redis index of RabbitMQ's deferred messages.
#![forbid(unsafe_code)]

pub mod admin;
pub mod amqp;
pub mod events;
pub mod fate;
pub mod id;
pub mod index;
mod journal;
pub mod metrics;
pub mod schedule;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use correu_proto::v1::QueuedMessage;
use correu_runtime::config::{QueueBackend, QueueConfig, RedisConfig};

pub use id::new_queue_id;
pub use schedule::{Next, Schedule};

/// Why a publish did not become durable. The client gets `451 4.3.0`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker cannot be reached, or the connection or channel broke.
    #[error("queue unavailable: {0}")]
    Unavailable(#[source] Box<QueueError>),
    #[error("broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker refused the message")]
    Nacked,
    /// Confirmed but returned: no queue took it (the topology is missing).
    #[error("the message was unroutable")]
    Unroutable,
    /// The channel was not in confirm mode (it is made anew).
    #[error("the channel does not confirm publishes")]
    NotConfirmed,
    /// Earlier messages are still unconfirmed past `publish_timeout`;
    /// this one was not sent.
    #[error("RabbitMQ has not confirmed {0} earlier message(s) in time; not sending more")]
    Stalled(usize),
    /// The confirm did not come and the message was withdrawn: it will
    /// not be delivered.
    #[error("withdrawn after {0}")]
    Withdrawn(#[source] Box<PublishError>),
    /// The client left while the confirm was awaited.
    #[error("the client left before the broker confirmed")]
    ClientGone,
    #[error("not a queue id: {0:?}")]
    BadQueueId(String),
    /// The spool was opened by an operator's command, which publishes nothing.
    #[error("the spool is open for the admin command only")]
    ReadOnly,
    #[error("spool write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors opening a queue or settling a delivery.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("AMQP operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("spool: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Not trying the broker again until a backoff ends.
    #[error("RabbitMQ unreachable; waiting before reconnecting")]
    Reconnecting,
    #[error(transparent)]
    Redis(#[from] correu_runtime::redis::RedisError),
}

impl PublishError {
    /// The queue could not take the message for now (the client gets `451`).
    pub fn unavailable(e: impl Into<QueueError>) -> PublishError {
        PublishError::Unavailable(Box::new(e.into()))
    }

    /// After this error the publishing channel is made anew. A nack
    /// counts: a channel of RabbitMQ 3.10 whose quorum queue lost its
    /// leader with a node goes on nacking every publish, while a new
    /// channel finds the new leader (the broker-cluster pod test: 15 s of
    /// nacks on the old channel, none on a new one).
    pub(crate) fn breaks_channel(&self) -> bool {
        matches!(
            self,
            PublishError::Timeout(_)
                | PublishError::Unavailable(_)
                | PublishError::NotConfirmed
                | PublishError::Nacked
        )
    }
}

/// A queue, cheap to clone and shared by every session and worker.
#[derive(Clone)]
pub enum Queue {
    Amqp(Arc<amqp::AmqpQueue>),
    Spool(Arc<spool::Spool>),
}

impl Queue {
    /// Opens the configured backend. RabbitMQ is not required to be up: the
    /// connection is made (and remade) when needed, and publishes fail with
    /// [`PublishError::Unavailable`] meanwhile.
    /// With `redis.url` set, a new message whose confirm never comes is
    /// withdrawn ([`fate`]).
    pub async fn open(
        cfg: &QueueConfig,
        backend: QueueBackend,
        redis: &RedisConfig,
    ) -> Result<Queue, QueueError> {
        Ok(match backend {
            QueueBackend::Rabbitmq => Queue::Amqp(Arc::new(amqp::AmqpQueue::new(
                cfg,
                fate::Fates::new(cfg, redis)?,
            ))),
            QueueBackend::Embedded => Queue::Spool(Arc::new(spool::Spool::open(&cfg.spool).await?)),
        })
    }

    /// The queue as the admin command sees it: RabbitMQ, or the spool of a
    /// running `correu serve` (whose unfinished writes are left alone).
    pub async fn open_for_admin(
        cfg: &QueueConfig,
        backend: QueueBackend,
    ) -> Result<Queue, QueueError> {
        Ok(match backend {
            QueueBackend::Rabbitmq => Queue::Amqp(Arc::new(amqp::AmqpQueue::new(cfg, None))),
            QueueBackend::Embedded => {
                Queue::Spool(Arc::new(spool::Spool::open_for_admin(&cfg.spool).await?))
            }
        })
    }

    /// Publishes a new message for delivery; `Ok` only once it is durable.
    pub async fn publish(&self, msg: &QueuedMessage) -> Result<(), PublishError> {
        self.publish_while(msg, std::future::pending()).await
    }

    /// The same, for a client that may leave meanwhile: `gone` resolves
    /// when it has. An error means the message will not be delivered
    /// (short of a broker that lost its confirm with no Redis to record
    /// the withdrawal, which is logged).
    pub async fn publish_while(
        &self,
        msg: &QueuedMessage,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let result = match self {
            Queue::Amqp(q) => q.publish_work(msg, gone).await,
            Queue::Spool(s) => s.publish(msg).await,
        };
        let attrs = [opentelemetry::KeyValue::new(
            "messaging.system",
            self.system(),
        )];
        match &result {
            Ok(()) => metrics::METRICS
                .publish_duration
                .record(started.elapsed().as_secs_f64(), &attrs),
            Err(_) => metrics::METRICS.errors.add(
                1,
                &[
                    attrs[0].clone(),
                    opentelemetry::KeyValue::new("operation", "publish"),
                ],
            ),
        }
        result
    }

    /// Publishes delivery events ([`events`]); `Ok` once every one is
    /// durable (confirmed by the broker, or written to the spool).
    pub async fn publish_events(&self, events: &[events::Event]) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        match self {
            Queue::Amqp(q) => q.publish_events(events).await,
            Queue::Spool(s) => s.publish_events(events).await,
        }
    }

    /// The messaging system, for spans and metrics.
    pub fn system(&self) -> &'static str {
        match self {
            Queue::Amqp(_) => "rabbitmq",
            Queue::Spool(_) => "spool",
        }
    }

    /// A consumer of messages to deliver.
    pub fn consumer(&self) -> Consumer {
        match self {
            Queue::Amqp(q) => Consumer::Amqp(Box::new(amqp::AmqpConsumer::new(q.clone()))),
            Queue::Spool(s) => Consumer::Spool(spool::SpoolConsumer::new(s.clone())),
        }
    }
}

/// The queue of a service running on its own (ingress or delivery as a
/// separate process): RabbitMQ. The embedded spool serves one process only.
pub async fn open_for_service(cfg: &QueueConfig, redis: &RedisConfig) -> Result<Queue, QueueError> {
    match cfg.backend.unwrap_or(QueueBackend::Rabbitmq) {
        QueueBackend::Rabbitmq => Queue::open(cfg, QueueBackend::Rabbitmq, redis).await,
        QueueBackend::Embedded => Err(QueueError::Io(std::io::Error::other(
            "queue.backend = \"embedded\" works only inside `correu serve`; separate services need RabbitMQ",
        ))),
    }
}

/// Hands out messages to deliver, reconnecting by itself.
pub enum Consumer {
    Amqp(Box<amqp::AmqpConsumer>),
    Spool(spool::SpoolConsumer),
}

impl Consumer {
    /// The next message. Waits until there is one; returns `None` only when
    /// `stop` is cancelled.
    pub async fn next(&mut self, stop: &tokio_util::sync::CancellationToken) -> Option<Delivery> {
        match self {
            Consumer::Amqp(c) => c.next(stop).await,
            Consumer::Spool(c) => c.next(stop).await,
        }
    }
}

/// One message handed out for delivery. It must be settled with one of
/// [`Delivery::ack`], [`Delivery::retry`] or [`Delivery::park`]; one that is
/// dropped unsettled comes back (after a restart or a reconnection).
pub struct Delivery {
    /// The decoded message, or `None` when it did not decode.
    pub message: Option<QueuedMessage>,
    /// The raw bytes, for parking what does not decode.
    pub raw: Vec<u8>,
    handle: Handle,
}

enum Handle {
    Amqp(amqp::AmqpHandle),
    Spool(spool::SpoolHandle),
}

impl Delivery {
    /// Done: every recipient's outcome is durable elsewhere.
    pub async fn ack(self) -> Result<(), QueueError> {
        match self.handle {
            Handle::Amqp(h) => h.ack().await,
            Handle::Spool(h) => h.ack().await,
        }
    }

    /// Tries `updated` (the recipients still pending, the attempt counted)
    /// again after the delay of retry tier `tier`, then settles this one.
    pub async fn retry(
        self,
        updated: &QueuedMessage,
        tier: usize,
        delay: Duration,
    ) -> Result<(), QueueError> {
        match self.handle {
            Handle::Amqp(h) => h.retry(updated, tier).await,
            Handle::Spool(h) => h.retry(updated, delay).await,
        }
    }

    /// Gives the message back unsettled, to be handed out again soon (after
    /// a failure of the consumer itself, not of the delivery).
    pub async fn release(self) -> Result<(), QueueError> {
        match self.handle {
            Handle::Amqp(h) => h.requeue().await,
            Handle::Spool(h) => {
                h.release();
                Ok(())
            }
        }
    }

    /// Keeps a message that cannot be processed aside, counted and visible,
    /// with the reason.
    pub async fn park(self, reason: &str) -> Result<(), QueueError> {
        match self.handle {
            Handle::Amqp(h) => h.park(&self.raw, reason).await,
            Handle::Spool(h) => h.park(&self.raw, reason).await,
        }
    }
}

/// A readiness check: the broker (or the spool) answers, the spool can
/// write, and the queue depths go to the `correu.queue.depth` gauge on the
/// way.
pub fn ready_check(queue: Queue) -> correu_runtime::health::Check {
    std::sync::Arc::new(move || {
        let q = queue.clone();
        Box::pin(async move {
            let counts = q.counts().await.map_err(|e| e.to_string())?;
            metrics::record_depths(&counts);
            // The spool must be able to take a message now: a full disk
            // answers every client 451, and such a server is not ready.
            if let Queue::Spool(s) = &q {
                let tmp = s.root().join("tmp");
                tokio::task::spawn_blocking(move || correu_runtime::sync::probe_writable(&tmp))
                    .await
                    .map_err(|e| format!("spool probe: {e}"))??;
            }
            Ok(())
        })
    })
}
