//! The RabbitMQ backend.
//!
//! Topology, declared idempotently by every process that connects (names
//! start with `queue.prefix`, `correu` by default):
//!
//! - `correu.work`: a durable direct exchange; routing key `delivery`.
//! - `correu.delivery`: a quorum queue bound to it, consumed by delivery.
//! - `correu.retry.<delay>`: one quorum queue per retry tier, with
//!   `x-message-ttl` = the delay, dead-lettering back to `correu.work` with
//!   `x-dead-letter-strategy=at-least-once` and `x-overflow=reject-publish`
//!   (at-least-once dead-lettering needs both). A message waits there, held
//!   by nobody, until its TTL ends.
//! - `correu.parked`: a quorum queue for what cannot be processed.
//!
//! Every publish is persistent (delivery mode 2), mandatory, and waits for
//! the broker's confirm under `queue.publish_timeout`. A new message
//! (ingress's) whose confirm is late waits longer, up to
//! `queue.confirm_timeout`, and is then withdrawn ([`crate::fate`]): a
//! `451` is only said of a message that will not be delivered.

use std::sync::Arc;
use std::time::Duration;

use correu_proto::v1::QueuedMessage;
use correu_runtime::backoff::Backoff;
use correu_runtime::config::QueueConfig;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use prost::Message;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::{Delivery, Handle, PublishError, QueueError};

const ROUTING_KEY: &str = "delivery";

/// Headers of a parked message: why, and when (Unix milliseconds).
const PARK_REASON: &str = "x-correu-park-reason";
const PARKED_AT: &str = "x-correu-parked-at";
/// The queue id in the headers of what Correu publishes.
const QUEUE_ID: &str = "x-correu-queue-id";

/// The names of everything Correu declares, from the prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub work_exchange: String,
    /// The topic exchange of delivery events ([`crate::events`]).
    pub events_exchange: String,
    /// `correu webhook`'s queue, bound to every event.
    pub webhook_queue: String,
    pub delivery_queue: String,
    pub parked_queue: String,
    /// (queue name, delay) per retry tier.
    pub retry_queues: Vec<(String, Duration)>,
}

impl Topology {
    pub fn new(prefix: &str, delays: &[Duration]) -> Self {
        Topology {
            work_exchange: format!("{prefix}.work"),
            events_exchange: format!("{prefix}.events"),
            webhook_queue: format!("{prefix}.webhook"),
            delivery_queue: format!("{prefix}.delivery"),
            parked_queue: format!("{prefix}.parked"),
            retry_queues: delays
                .iter()
                .map(|d| (format!("{prefix}.retry.{}", tier_name(*d)), *d))
                .collect(),
        }
    }
}

/// `90s` → `1m30s` style names, readable in the management UI.
fn tier_name(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60, d.subsec_millis()) {
        (0, 0, 0, ms) => format!("{ms}ms"),
        (0, 0, s, _) => format!("{s}s"),
        (0, m, 0, _) => format!("{m}m"),
        (h, 0, 0, _) => format!("{h}h"),
        _ => format!("{s}s"),
    }
}

/// Declares the durable topic exchange of delivery events (delivery
/// publishes to it; `correu webhook` binds its queue to it).
pub async fn declare_events_exchange(ch: &Channel, name: &str) -> lapin::Result<()> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declares `correu webhook`'s durable quorum queue and binds it to every
/// event (`#`); the webhook filters outcomes itself, so one queue serves
/// any `webhook.outcomes`.
pub async fn declare_webhook_queue(ch: &Channel, t: &Topology) -> lapin::Result<()> {
    declare_events_exchange(ch, &t.events_exchange).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(t.webhook_queue.as_str().into(), durable, quorum_args())
        .await?;
    ch.queue_bind(
        t.webhook_queue.as_str().into(),
        t.events_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Arguments of a quorum queue (replicated; what every Correu queue is).
pub fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Reconnecting to the broker: first after a tenth of a second, then at
/// least once a second. A refused connection costs the broker almost
/// nothing, and while it is away every client is being turned away, so
/// the moment it is back should be found within a second, not after a
/// long backoff (ingress took 7.5 s and delivery 10 s with a 10 s cap).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

struct Link {
    conn: Option<Arc<Connection>>,
    publisher: Option<Channel>,
    /// No reconnection before this instant (backoff after a failure).
    not_before: Option<Instant>,
    backoff: Backoff,
}

/// A RabbitMQ connection shared by publishers and consumers of a process,
/// made on first use and remade after it breaks.
pub struct AmqpQueue {
    url: String,
    topology: Topology,
    publish_timeout: Duration,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    prefetch: u16,
    link: Mutex<Link>,
    /// Withdrawals and claims, when Redis is configured.
    fates: Option<crate::fate::Fates>,
    /// New messages handed to the broker and unconfirmed past
    /// `publish_timeout`: while there are any, new ones are not sent.
    overdue: std::sync::atomic::AtomicUsize,
    /// Whether events are kept for `correu webhook` ([`Self::keep_events`]),
    /// and whether its queue has been declared yet.
    keep_events: std::sync::atomic::AtomicBool,
    webhook_declared: std::sync::atomic::AtomicBool,
}

impl AmqpQueue {
    pub fn new(cfg: &QueueConfig, fates: Option<crate::fate::Fates>) -> Self {
        let delays: Vec<Duration> = cfg.retry_delays.iter().map(|d| d.get()).collect();
        AmqpQueue {
            url: cfg.url.clone(),
            topology: Topology::new(&cfg.prefix, &delays),
            publish_timeout: cfg.publish_timeout.get(),
            confirm_timeout: cfg.confirm_timeout.get(),
            fates,
            overdue: std::sync::atomic::AtomicUsize::new(0),
            keep_events: Default::default(),
            webhook_declared: Default::default(),
            connect_timeout: cfg.connect_timeout.get(),
            prefetch: cfg.prefetch,
            link: Mutex::new(Link {
                conn: None,
                publisher: None,
                not_before: None,
                backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Events are for `correu webhook` (`webhook.urls` is set): its queue
    /// is declared before the first event is published, so an event
    /// published before the webhook service first starts is kept, not
    /// dropped by the exchange for want of a queue.
    pub fn keep_events(&self) {
        self.keep_events
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A consumer of `correu webhook`'s queue on a channel of its own, at
    /// most `prefetch` events unacknowledged.
    pub async fn consume_events(&self, prefetch: u16) -> Result<lapin::Consumer, QueueError> {
        self.consume(&self.topology.webhook_queue, prefetch, true)
            .await
    }

    /// A consumer of `queue` on a channel of its own (declaring the
    /// webhook's queue first when `webhook`), within `connect_timeout`.
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        webhook: bool,
    ) -> Result<lapin::Consumer, QueueError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let setup = async {
            let ch = conn.create_channel().await?;
            if webhook {
                declare_webhook_queue(&ch, &self.topology).await?;
            }
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            ch.basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        };
        timeout(self.connect_timeout, setup)
            .await
            .map_err(|_| QueueError::Timeout(self.connect_timeout))?
            .map_err(QueueError::Amqp)
    }

    /// Declares the whole topology on `ch`; safe to repeat.
    async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let t = &self.topology;
        ch.exchange_declare(
            t.work_exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        declare_events_exchange(ch, &t.events_exchange).await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(t.delivery_queue.as_str().into(), durable, quorum_args())
            .await?;
        ch.queue_bind(
            t.delivery_queue.as_str().into(),
            t.work_exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for (name, delay) in &t.retry_queues {
            let mut args = quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(t.work_exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(ROUTING_KEY.into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            ch.queue_declare(name.as_str().into(), durable, args)
                .await?;
        }
        ch.queue_declare(t.parked_queue.as_str().into(), durable, quorum_args())
            .await?;
        Ok(())
    }

    /// A live connection, connecting (and declaring the topology) if needed.
    async fn connection(&self, link: &mut Link) -> Result<Arc<Connection>, QueueError> {
        if let Some(c) = &link.conn
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        link.conn = None;
        link.publisher = None;
        if let Some(t) = link.not_before
            && Instant::now() < t
        {
            return Err(QueueError::Reconnecting);
        }
        let attempt = async {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            self.declare(&ch).await?;
            // A channel that declared is closed: the topology stays.
            ch.close(200, "declared".into()).await?;
            Ok::<_, lapin::Error>(Arc::new(conn))
        };
        match timeout(self.connect_timeout, attempt).await {
            Ok(Ok(conn)) => {
                tracing::info!("connected to RabbitMQ");
                link.backoff.reset();
                link.not_before = None;
                link.conn = Some(conn.clone());
                Ok(conn)
            }
            failed => {
                let delay = link.backoff.next_delay(rand::random());
                link.not_before = Some(Instant::now() + delay);
                let err = match failed {
                    Ok(Err(e)) => QueueError::Amqp(e),
                    _ => QueueError::Timeout(self.connect_timeout),
                };
                tracing::warn!(error = %err, retry_in = ?delay, "cannot connect to RabbitMQ");
                Err(err)
            }
        }
    }

    /// The shared publishing channel, with confirms on.
    async fn publisher(&self) -> Result<Channel, PublishError> {
        let mut link = self.link.lock().await;
        if let Some(ch) = &link.publisher
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        link.publisher = None;
        let conn = self
            .connection(&mut link)
            .await
            .map_err(PublishError::unavailable)?;
        let setup = async {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        };
        let ch = timeout(self.connect_timeout, setup)
            .await
            .map_err(|_| PublishError::Timeout(self.connect_timeout))?
            .map_err(PublishError::unavailable)?;
        link.publisher = Some(ch.clone());
        Ok(ch)
    }

    /// Drops the publishing channel after an error, so the next publish
    /// makes a new one (and reconnects if the connection is gone).
    async fn forget_publisher(&self) {
        self.link.lock().await.publisher = None;
    }

    /// Publishes `payload` and waits for the confirm, all within
    /// `publish_timeout` (retries, parking and operators' moves: the
    /// message they settle stays in its queue when this fails).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.publish_timeout;
        let ch = self.publisher_by(deadline).await?;
        let send = send(&ch, exchange, routing_key, payload, props);
        let result = match tokio::time::timeout_at(deadline, send).await {
            Err(_) => Err(PublishError::Timeout(self.publish_timeout)),
            Ok(r) => confirmed(r),
        };
        if result.as_ref().is_err_and(PublishError::breaks_channel) {
            self.forget_publisher().await;
        }
        result
    }

    /// The publishing channel, by `deadline`.
    async fn publisher_by(&self, deadline: Instant) -> Result<Channel, PublishError> {
        tokio::time::timeout_at(deadline, self.publisher())
            .await
            .map_err(|_| PublishError::Timeout(self.publish_timeout))?
    }

    /// Publishes a new message to the work exchange. `Ok` only when the
    /// broker confirmed it (or delivery already has it); an error only
    /// when it will not be delivered, or (without Redis) cannot be
    /// withdrawn, which is logged. `gone` resolves if the client stops
    /// waiting for the answer; the message is then withdrawn, since the
    /// client will send it again.
    pub async fn publish_work(
        &self,
        msg: &QueuedMessage,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<(), PublishError> {
        use std::sync::atomic::Ordering;
        let id = msg.queue_id.as_str();
        let started = Instant::now();
        let deadline = started + self.publish_timeout;
        // Not sent: a 451 is the truth.
        let overdue = self.overdue.load(Ordering::Relaxed);
        if overdue > 0 {
            return Err(PublishError::Stalled(overdue));
        }
        let ch = self.publisher_by(deadline).await?;
        let payload = msg.encode_to_vec();
        let send = send(
            &ch,
            &self.topology.work_exchange,
            ROUTING_KEY,
            &payload,
            properties(msg),
        );
        tokio::pin!(send);
        // A client that leaves matters only once the confirm is late, and
        // only if the message can be withdrawn: a client that closes its
        // side as soon as it has sent (and still reads) must not lose a
        // message the broker confirms at once.
        let gone = async {
            tokio::time::sleep_until(deadline).await;
            match self.fates {
                Some(_) => gone.await,
                None => std::future::pending().await,
            }
        };
        // From here the message may be in the broker whatever happens.
        let waited = async {
            if let Ok(r) = tokio::time::timeout_at(deadline, &mut send).await {
                return Some(r);
            }
            let _overdue = Overdue::count(&self.overdue);
            tracing::warn!(queue_id = id, waited = ?self.publish_timeout, "RabbitMQ has not confirmed; new messages are refused until it does");
            tokio::time::timeout_at(started + self.confirm_timeout, &mut send)
                .await
                .ok()
        };
        let (result, why) = tokio::select! {
            r = waited => match r {
                Some(r) => match confirmed(r) {
                    Ok(()) => return Ok(()),
                    // Returned unroutable: no queue took it.
                    Err(e @ PublishError::Unroutable) => return Err(e),
                    Err(e) => {
                        if e.breaks_channel() {
                            self.forget_publisher().await;
                        }
                        let why = e.to_string();
                        (e, why)
                    }
                },
                None => (
                    PublishError::Timeout(self.confirm_timeout),
                    format!("no confirm within {:?}", self.confirm_timeout),
                ),
            },
            _ = gone => (
                PublishError::ClientGone,
                "the client left before the confirm".to_string(),
            ),
        };
        self.withdraw(id, result, &why).await
    }

    /// A new message whose fate the broker did not tell: withdrawn so it
    /// is never delivered, unless delivery has it already.
    async fn withdraw(&self, id: &str, cause: PublishError, why: &str) -> Result<(), PublishError> {
        let unconfirmed = &crate::metrics::METRICS.unconfirmed;
        let Some(fates) = &self.fates else {
            unconfirmed.add(1, &[opentelemetry::KeyValue::new("outcome", "unknown")]);
            tracing::error!(
                queue_id = id,
                reason = why,
                "the broker did not confirm a message and it cannot be withdrawn without redis.url: it may still be delivered after the client was told 451"
            );
            return Err(cause);
        };
        match fates.withdraw(id).await {
            Ok(crate::fate::Fate::Withdrawn) => {
                unconfirmed.add(1, &[opentelemetry::KeyValue::new("outcome", "withdrawn")]);
                tracing::warn!(
                    queue_id = id,
                    reason = why,
                    "message withdrawn: it will not be delivered"
                );
                Err(PublishError::Withdrawn(Box::new(cause)))
            }
            Ok(crate::fate::Fate::Delivering) => {
                unconfirmed.add(1, &[opentelemetry::KeyValue::new("outcome", "delivering")]);
                tracing::info!(
                    queue_id = id,
                    reason = why,
                    "no confirm, but delivery already has the message: it is queued"
                );
                Ok(())
            }
            Err(e) => {
                unconfirmed.add(1, &[opentelemetry::KeyValue::new("outcome", "unknown")]);
                tracing::error!(queue_id = id, reason = why, error = %e, "the broker did not confirm a message and Redis could not record its withdrawal: it may still be delivered after the client was told 451");
                Err(cause)
            }
        }
    }

    /// Publishes delivery events to the events exchange, all sent before
    /// any confirm is awaited, within `publish_timeout`. Not mandatory: an
    /// event no consumer has bound a queue for is dropped by the broker.
    pub async fn publish_events(
        &self,
        events: &[crate::events::Event],
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.publish_timeout;
        let ch = self.publisher_by(deadline).await?;
        let sent = async {
            use std::sync::atomic::Ordering::Relaxed;
            if self.keep_events.load(Relaxed) && !self.webhook_declared.load(Relaxed) {
                declare_webhook_queue(&ch, &self.topology).await?;
                self.webhook_declared.store(true, Relaxed);
            }
            let mut confirms = Vec::with_capacity(events.len());
            for e in events {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/x-protobuf".into())
                    .with_type("correu.v1.DeliveryEvent".into())
                    .with_message_id(e.id.as_str().into());
                confirms.push(
                    ch.basic_publish(
                        self.topology.events_exchange.as_str().into(),
                        e.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &e.payload,
                        props,
                    )
                    .await?,
                );
            }
            let mut result = Ok(());
            for c in confirms {
                match confirmed(c.await) {
                    // Not mandatory: a return cannot come; an ack is enough.
                    Ok(()) | Err(PublishError::Unroutable) => {}
                    Err(e) => result = Err(e),
                }
            }
            Ok::<_, lapin::Error>(result)
        };
        let result = match tokio::time::timeout_at(deadline, sent).await {
            Err(_) => Err(PublishError::Timeout(self.publish_timeout)),
            Ok(Err(e)) => Err(PublishError::unavailable(e)),
            Ok(Ok(r)) => r,
        };
        if result.as_ref().is_err_and(PublishError::breaks_channel) {
            self.forget_publisher().await;
        }
        result
    }

    /// Publishes bytes as they are to the work exchange (for tools that
    /// move messages between queues, and for tests of broken producers).
    pub async fn publish_raw(&self, payload: &[u8]) -> Result<(), PublishError> {
        let props = BasicProperties::default().with_delivery_mode(2);
        self.publish(&self.topology.work_exchange, ROUTING_KEY, payload, props)
            .await
    }

    /// The same with an AMQP `message_id`, as another producer would set it.
    pub async fn publish_raw_with_id(
        &self,
        payload: &[u8],
        message_id: &str,
    ) -> Result<(), PublishError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message_id.into());
        self.publish(&self.topology.work_exchange, ROUTING_KEY, payload, props)
            .await
    }

    /// Messages per queue, from passive declares.
    pub async fn counts(&self) -> Result<Vec<crate::admin::QueueCount>, QueueError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let ch = conn.create_channel().await?;
        let t = &self.topology;
        let mut names = vec![t.delivery_queue.clone()];
        names.extend(t.retry_queues.iter().map(|(n, _)| n.clone()));
        names.push(t.parked_queue.clone());
        let mut out = Vec::new();
        for name in names {
            let messages = u64::from(ready(&ch, &name).await?);
            out.push(crate::admin::QueueCount { name, messages });
        }
        ch.close(200, "counted".into()).await?;
        Ok(out)
    }

    /// Takes the messages of `queue` that `which` picks: republished to the
    /// work exchange (confirmed) when `republish`, else dropped; the others
    /// go back to the queue when the channel closes. Returns how many.
    pub async fn sweep(
        &self,
        queue: &str,
        which: crate::admin::Which<'_>,
        republish: bool,
    ) -> Result<usize, QueueError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let ch = conn.create_channel().await?;
        let total = ready(&ch, queue).await?;
        let mut moved = 0;
        if total > 0 {
            ch.basic_qos(
                total.min(u32::from(u16::MAX)) as u16,
                BasicQosOptions::default(),
            )
            .await?;
            let mut consumer = ch
                .basic_consume(
                    queue.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut seen = 0;
            let mut waited = Duration::ZERO;
            while seen < total {
                let d = match timeout(crate::admin::SWEEP_IDLE, consumer.next()).await {
                    Ok(Some(Ok(d))) => d,
                    Ok(_) => break,
                    Err(_) => {
                        // Nothing for a while: wait on while the broker still
                        // holds ready messages (it is busy), not once they
                        // have left (a retry tier's TTL ran out meanwhile).
                        waited += crate::admin::SWEEP_IDLE;
                        if ready(&ch, queue).await? == 0 || waited >= crate::admin::SWEEP_PATIENCE {
                            break;
                        }
                        continue;
                    }
                };
                seen += 1;
                let header_id = property_id(&d.properties);
                if !which.matches_raw(&d.data, header_id.as_deref()) {
                    continue;
                }
                if republish {
                    // As it came, less what parking added.
                    let props = republished(&d.properties, &[PARK_REASON, PARKED_AT], Vec::new());
                    self.publish(&self.topology.work_exchange, ROUTING_KEY, &d.data, props)
                        .await?;
                }
                d.acker.ack(BasicAckOptions::default()).await?;
                moved += 1;
            }
        }
        // Unacked messages go back to the queue.
        ch.close(200, "swept".into()).await?;
        // A quorum queue makes them ready again a moment after the channel
        // closes: wait for that (up to 2 s, since a retry tier's TTL may
        // take some meanwhile), so the next operator action sees them (a
        // retry_now right after a delete found nothing).
        let back = u64::from(total).saturating_sub(moved as u64);
        if back > 0 {
            let check = conn.create_channel().await?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while u64::from(ready(&check, queue).await?) < back && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            check.close(200, "checked".into()).await?;
        }
        Ok(moved)
    }

    /// Up to `limit` parked messages, oldest first, looked at without
    /// taking them: each is fetched unacknowledged and given back
    /// (`basic.nack` with requeue) once all are seen, and if this process
    /// dies meanwhile the broker returns them when the connection closes.
    pub async fn parked(&self, limit: usize) -> Result<Vec<crate::admin::Parked>, QueueError> {
        let conn = {
            let mut link = self.link.lock().await;
            self.connection(&mut link).await?
        };
        let ch = conn.create_channel().await?;
        let queue = self.topology.parked_queue.as_str();
        let total = ready(&ch, queue).await? as usize;
        let mut held = Vec::new();
        let mut out = Vec::new();
        let looked = async {
            while out.len() < total.min(limit) {
                let got = timeout(
                    crate::admin::SWEEP_IDLE,
                    ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
                )
                .await;
                let Ok(got) = got else { break };
                let Some(m) = got? else { break };
                let d = m.delivery;
                out.push(parked_entry(&d.properties, &d.data));
                held.push(d.acker);
            }
            Ok::<_, QueueError>(())
        }
        .await;
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        for acker in held {
            // What is not given back here returns when the channel closes.
            if let Err(e) = acker.nack(requeue).await {
                tracing::warn!(error = %e, "cannot give a parked message back; it returns when the channel closes");
                break;
            }
        }
        ch.close(200, "listed".into()).await?;
        looked?;
        Ok(out)
    }

    /// Opens a consuming channel on the delivery queue.
    async fn open_consumer(&self) -> Result<lapin::Consumer, QueueError> {
        self.consume(&self.topology.delivery_queue, self.prefetch, false)
            .await
    }
}

/// Hands `payload` to the broker and waits for its confirm.
async fn send(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> lapin::Result<Confirmation> {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        payload,
        props,
    )
    .await?
    .await
}

/// What a confirm (or its failure) means for the message.
fn confirmed(r: lapin::Result<Confirmation>) -> Result<(), PublishError> {
    match r {
        Err(e) => Err(PublishError::unavailable(e)),
        // Acked but returned: no queue took it (topology missing).
        Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable),
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
        Ok(Confirmation::NotRequested) => Err(PublishError::NotConfirmed),
    }
}

/// Counts one overdue publish while alive.
struct Overdue<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Overdue<'a> {
    fn count(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Overdue(n)
    }
}

impl Drop for Overdue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Persistent, with the queue id, attempt, first-received time and trace
/// context in headers so they can be read without decoding the body.
fn properties(msg: &QueuedMessage) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(
        QUEUE_ID.into(),
        AMQPValue::LongString(msg.queue_id.as_str().into()),
    );
    h.insert(
        "x-correu-attempt".into(),
        AMQPValue::LongLongInt(i64::from(msg.attempt)),
    );
    h.insert(
        "x-correu-received-at".into(),
        AMQPValue::LongLongInt(msg.received_at_unix_micros),
    );
    if !msg.traceparent.is_empty() {
        h.insert(
            "traceparent".into(),
            AMQPValue::LongString(msg.traceparent.as_str().into()),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/x-protobuf".into())
        .with_message_id(msg.queue_id.as_str().into())
        .with_headers(h)
}

/// The queue id a message carries in its properties: Correu's header,
/// else the AMQP `message_id` (what another producer sets).
fn property_id(p: &BasicProperties) -> Option<String> {
    header_text(p, QUEUE_ID)
        .or_else(|| p.message_id().as_ref().map(|m| m.to_string()))
        .filter(|id| !id.is_empty())
}

/// A header's text, when it has some.
fn header_text(p: &BasicProperties, name: &str) -> Option<String> {
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// What `queue list --parked` shows of a parked message.
fn parked_entry(p: &BasicProperties, data: &[u8]) -> crate::admin::Parked {
    let queue_id = property_id(p)
        .or_else(|| {
            QueuedMessage::decode(data)
                .ok()
                .map(|m| m.queue_id)
                .filter(|id| !id.is_empty())
        })
        .unwrap_or_default();
    let parked_at_unix_ms = match p.headers().as_ref().and_then(|h| h.inner().get(PARKED_AT)) {
        Some(AMQPValue::LongLongInt(ms)) => Some(*ms),
        _ => None,
    };
    crate::admin::Parked {
        queue_id,
        reason: header_text(p, PARK_REASON).unwrap_or_default(),
        bytes: data.len() as u64,
        parked_at_unix_ms,
    }
}

/// `p` for publishing a message again (parked, or moved by an operator):
/// every property kept, persistent, except `expiration` (it must not
/// expire where it goes) and `user_id` (the broker refuses one that is not
/// the publishing connection's user); headers named in `strip` left out,
/// those in `add` set.
fn republished(
    p: &BasicProperties,
    strip: &[&str],
    add: Vec<(&str, AMQPValue)>,
) -> BasicProperties {
    let mut out = BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    let mut h = FieldTable::default();
    if let Some(old) = p.headers() {
        for (k, v) in old.inner() {
            if !strip.contains(&k.as_str()) {
                h.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in add {
        h.insert(k.into(), v);
    }
    if h.inner().is_empty() {
        out
    } else {
        out.with_headers(h)
    }
}

/// Consumes the delivery queue, reconnecting with backoff.
pub struct AmqpConsumer {
    queue: Arc<AmqpQueue>,
    stream: Option<lapin::Consumer>,
    backoff: Backoff,
}

impl AmqpConsumer {
    pub fn new(queue: Arc<AmqpQueue>) -> Self {
        AmqpConsumer {
            queue,
            stream: None,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
        }
    }

    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let stream = match &mut self.stream {
                Some(s) => s,
                None => match self.queue.open_consumer().await {
                    Ok(s) => {
                        self.backoff.reset();
                        self.stream.insert(s)
                    }
                    Err(e) => {
                        let delay = self.backoff.next_delay(rand::random());
                        tracing::warn!(error = %e, retry_in = ?delay, "cannot consume from RabbitMQ");
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(delay) => continue,
                        }
                    }
                },
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                item = stream.next() => match item {
                    Some(Ok(d)) => {
                        let message = QueuedMessage::decode(d.data.as_slice()).ok();
                        if let Some(m) = &message
                            && !self.claim(m, &d.acker, stop).await
                        {
                            continue;
                        }
                        return Some(Delivery {
                            message,
                            raw: d.data,
                            handle: Handle::Amqp(AmqpHandle {
                                queue: self.queue.clone(),
                                acker: d.acker,
                                properties: Box::new(d.properties),
                            }),
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "RabbitMQ consumer failed; reconnecting");
                        self.stream = None;
                    }
                    None => {
                        tracing::warn!("RabbitMQ consumer closed; reconnecting");
                        self.stream = None;
                    }
                },
            }
        }
    }
}

impl AmqpConsumer {
    /// Takes a message ingress published (attempt 0) from under a
    /// possible withdrawal ([`crate::fate`]); whether to deliver it. A
    /// withdrawn one is acked and dropped. When Redis cannot say, the
    /// message goes back to the queue after a pause: delivered later,
    /// never twice.
    async fn claim(
        &self,
        m: &QueuedMessage,
        acker: &lapin::Acker,
        stop: &CancellationToken,
    ) -> bool {
        let Some(fates) = &self.queue.fates else {
            return true;
        };
        if m.attempt > 0 {
            return true;
        }
        let id = m.queue_id.as_str();
        match fates.claim(id).await {
            Ok(crate::fate::Fate::Delivering) => true,
            Ok(crate::fate::Fate::Withdrawn) => {
                tracing::warn!(
                    queue_id = id,
                    "message withdrawn by ingress (the client was told 451); dropped undelivered"
                );
                crate::metrics::METRICS.withdrawn_dropped.add(1, &[]);
                if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(queue_id = id, error = %e, "cannot ack a withdrawn message; it will be dropped when it comes back");
                }
                false
            }
            Err(e) => {
                tracing::warn!(queue_id = id, error = %e, "cannot check whether the message was withdrawn; it goes back to the queue");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if let Err(e) = acker.nack(requeue).await {
                    tracing::warn!(queue_id = id, error = %e, "cannot give the message back; it returns on reconnection");
                }
                false
            }
        }
    }
}

pub(crate) struct AmqpHandle {
    queue: Arc<AmqpQueue>,
    acker: lapin::Acker,
    /// As published: a parked message keeps them (boxed: they are large
    /// and rarely read).
    properties: Box<BasicProperties>,
}

impl AmqpHandle {
    pub(crate) async fn ack(self) -> Result<(), QueueError> {
        self.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Republishes to the retry tier (confirmed), then acks. If the
    /// republish fails the message is returned to the queue instead.
    pub(crate) async fn retry(
        self,
        updated: &QueuedMessage,
        tier: usize,
    ) -> Result<(), QueueError> {
        let tiers = &self.queue.topology.retry_queues;
        let Some((name, _)) = tiers.get(tier).or(tiers.last()) else {
            return self.requeue().await;
        };
        let payload = updated.encode_to_vec();
        match self
            .queue
            .publish("", name, &payload, properties(updated))
            .await
        {
            Ok(()) => self.ack().await,
            Err(e) => {
                tracing::warn!(queue_id = %updated.queue_id, error = %e, "retry publish failed; requeueing");
                self.requeue().await?;
                Err(e.into())
            }
        }
    }

    pub(crate) async fn requeue(self) -> Result<(), QueueError> {
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Moves the message to the parked queue as it came (its properties,
    /// message id and headers kept, so an operator can find it by id even
    /// when its body does not decode), with the reason and the time.
    pub(crate) async fn park(self, raw: &[u8], reason: &str) -> Result<(), QueueError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let props = republished(
            &self.properties,
            &[],
            vec![
                (PARK_REASON, AMQPValue::LongString(reason.into())),
                (PARKED_AT, AMQPValue::LongLongInt(now_ms)),
            ],
        );
        let parked = self.queue.topology.parked_queue.clone();
        match self.queue.publish("", &parked, raw, props).await {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.requeue().await?;
                Err(e.into())
            }
        }
    }
}

/// Messages ready in `queue` (not those delivered and unacked), from a
/// passive declare.
async fn ready(ch: &Channel, queue: &str) -> Result<u32, QueueError> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_prefix_and_delays() {
        let t = Topology::new(
            "correu",
            &[
                Duration::from_secs(60),
                Duration::from_secs(3600),
                Duration::from_secs(90),
                Duration::from_millis(500),
            ],
        );
        assert_eq!(t.work_exchange, "correu.work");
        assert_eq!(t.delivery_queue, "correu.delivery");
        let names: Vec<_> = t.retry_queues.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "correu.retry.1m",
                "correu.retry.1h",
                "correu.retry.90s",
                "correu.retry.500ms"
            ]
        );
    }
}
