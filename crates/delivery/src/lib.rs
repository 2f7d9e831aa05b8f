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
//! - [`route`]: routes, MX lookup, addresses. [`pool`]: kept connections.
//! - [`client`]: the SMTP client; [`tls`]: opportunistic and verified TLS;
//!   [`mta_sts`]: domains that require verified TLS (RFC 8461).
//! - [`dsn`]: bounces and success reports (RFC 3464); [`dkim`]: signing.
#![forbid(unsafe_code)]

pub mod client;
pub mod dkim;
pub mod dsn;
pub mod metrics;
pub mod mta_sts;
pub mod outcome;
pub mod pool;
pub mod route;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_proto::v1::{DeliverRequest, QueuedMessage};
use correu_queue::{Delivery, Next, Queue, Schedule};
use correu_runtime::Config;
use correu_runtime::config::OutboundTls;
use correu_storage_client::Client as StorageClient;
use opentelemetry::KeyValue;
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

/// How long a delivery waits for a connection lease to a busy host before
/// the message goes to a retry tier, and how often it looks meanwhile.
const LEASE_WAIT: Duration = Duration::from_secs(20);
const LEASE_POLL: Duration = Duration::from_millis(200);

pub struct Deliverer {
    delay_warning: Duration,
    lease_freed: tokio::sync::Notify,
    queue: Queue,
    pool: pool::Pool,
    dkim: Arc<dkim::Dkim>,
    leases: correu_runtime::limits::Leases,
    rates: correu_runtime::limits::RateLimiter,
    max_per_host: usize,
    domain_rate: correu_runtime::config::Rate,
    bounces: bool,
    /// TLS for hops without a route of their own, and the connectors.
    tls_default: OutboundTls,
    opportunistic: tls::TlsPolicy,
    required: tls::TlsPolicy,
    mta_sts: Option<mta_sts::MtaSts>,
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
    pub fn new(cfg: &Config, queue: Queue, storage: StorageClient) -> anyhow::Result<Self> {
        let resolver = route::resolver(cfg.delivery.dns_server)?;
        let verified = tls::verified(cfg.delivery.tls_ca_file.as_deref())?;
        // One Redis pool for leases, rates and the deferred index.
        let redis = correu_runtime::redis::pool(&cfg.redis)?;
        Ok(Deliverer {
            delay_warning: cfg.delivery.delay_warning.get(),
            lease_freed: tokio::sync::Notify::new(),
            queue,
            pool: pool::Pool::new(
                cfg.delivery.max_connections_per_host,
                cfg.delivery.connection_idle.get(),
            ),
            dkim: Arc::new(dkim::Dkim::new(&cfg.delivery.dkim)?),
            // A lease outlives no attempt: it expires with the attempt deadline.
            leases: correu_runtime::limits::Leases::with_pool(
                &cfg.redis,
                redis.clone(),
                cfg.delivery.attempt_timeout.get(),
            ),
            rates: correu_runtime::limits::RateLimiter::with_pool(&cfg.redis, redis.clone()),
            max_per_host: cfg.delivery.max_connections_per_host,
            domain_rate: cfg.delivery.domain_rate,
            bounces: cfg.delivery.bounces,
            tls_default: cfg.delivery.tls,
            opportunistic: tls::TlsPolicy::Opportunistic(tls::opportunistic()?),
            mta_sts: cfg.delivery.mta_sts.then(|| {
                mta_sts::MtaSts::new(
                    resolver.clone(),
                    verified.clone(),
                    cfg.delivery.mta_sts_port,
                    cfg.delivery.connect_timeout.get(),
                )
            }),
            required: tls::TlsPolicy::Required(verified),
            index: correu_queue::index::DeferredIndex::with_pool(&cfg.redis, redis),
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
        // The message's trace goes on: ingress's publish is the parent,
        // on every attempt (retries republish the same traceparent).
        let span = tracing::info_span!(
            parent: None,
            "delivery.message",
            queue_id = %msg.queue_id,
            attempt = msg.attempt + 1,
            trace_id = tracing::field::Empty,
            "messaging.system" = self.queue.system(),
            "messaging.operation.type" = "process",
            "messaging.message.id" = %msg.queue_id,
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
            Ok(outcomes) => {
                self.panics().remove(&msg.queue_id);
                self.settle(delivery, msg, outcomes).instrument(span).await;
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
            Outcome::temp(
                "4.4.7",
                format!("attempt took longer than {:?}", self.attempt_timeout),
            )
        };
        let mut outcomes = vec![Outcome::temp("4.4.7", "not attempted"); msg.recipients.len()];
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
        let content = if remote.is_empty() {
            None
        } else {
            self.signed(msg).await
        };
        let content = content.as_deref().unwrap_or(&msg.content);
        for (domain, idx) in remote {
            let got =
                tokio::time::timeout_at(deadline, self.deliver_remote(msg, content, &domain, &idx))
                    .await
                    .unwrap_or_else(|_| vec![late(); idx.len()]);
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
        let span = tracing::info_span!(
            "storage.deliver",
            queue_id = %msg.queue_id,
            "rpc.system" = "grpc",
            "rpc.service" = "correu.v1.Storage",
            "rpc.method" = "Deliver",
            "otel.kind" = "client",
        );
        let req = span.in_scope(|| correu_storage_client::traced(req));
        match timeout(self.storage_timeout, client.deliver(req))
            .instrument(span)
            .await
        {
            Ok(Ok(_)) => Outcome::LOCAL,
            Ok(Err(status)) => outcome::from_status(&status),
            Err(_) => Outcome::temp(
                "4.3.0",
                format!("storage did not answer within {:?}", self.storage_timeout),
            ),
        }
    }

    /// The message with a DKIM signature when its From: domain has a key
    /// (signing runs on the blocking pool); `None` to send it as it is.
    async fn signed(&self, msg: &QueuedMessage) -> Option<Vec<u8>> {
        if self.dkim.is_empty() {
            return None;
        }
        let (dkim, content) = (self.dkim.clone(), msg.content.clone());
        let signed = tokio::task::spawn_blocking(move || {
            let header = dkim.sign(&content)?;
            Some(header.map(|h| [h.into_bytes(), content].concat()))
        })
        .await;
        match signed {
            Ok(Some(Ok(bytes))) => Some(bytes),
            Ok(Some(Err(e))) => {
                tracing::error!(queue_id = %msg.queue_id, error = %e, "DKIM signing failed; sending unsigned");
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(queue_id = %msg.queue_id, error = %e, "DKIM signing task failed; sending unsigned");
                None
            }
        }
    }

    /// Tries the domain's hops in order until one gives every recipient an
    /// answer. `rcpts` are indexes into `msg.recipients`; `content` is the
    /// message as it goes out (signed, when it is).
    async fn deliver_remote(
        &self,
        msg: &QueuedMessage,
        content: &[u8],
        domain: &str,
        rcpts: &[usize],
    ) -> Vec<Outcome> {
        let hops = match self.router.hops(domain).await {
            Ok(h) => h,
            Err(o) => return vec![o; rcpts.len()],
        };
        let hops = match self.apply_mta_sts(&msg.queue_id, domain, hops).await {
            Ok(h) => h,
            Err(o) => return vec![o; rcpts.len()],
        };
        if !self
            .rates
            .allow("domain-msg", domain, self.domain_rate)
            .await
        {
            let o = Outcome::temp("4.4.5", format!("{domain} is at its message rate; waiting"));
            return vec![o; rcpts.len()];
        }
        let mut last = Outcome::temp("4.4.4", format!("no host to deliver to for {domain}"));
        for hop in hops {
            let addrs = match self.router.addresses(&hop).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    last = Outcome::temp("4.4.4", format!("{} has no address", hop.host));
                    continue;
                }
                Err(e) => {
                    last = Outcome::temp("4.4.4", e);
                    continue;
                }
            };
            for addr in addrs {
                let span = tracing::info_span!(
                    "delivery.attempt",
                    queue_id = %msg.queue_id,
                    mx = %hop.host,
                    %addr,
                    "server.address" = %hop.host,
                    "server.port" = addr.port(),
                    "network.peer.address" = %addr.ip(),
                    outcome = tracing::field::Empty,
                    "smtp.reply.code" = tracing::field::Empty,
                );
                let tried = self
                    .try_host(msg, content, &hop, addr, rcpts)
                    .instrument(span.clone())
                    .await;
                match &tried {
                    Ok(outcomes) => {
                        let delivered = outcomes.iter().filter(|o| o.is_delivered()).count();
                        span.record(
                            "outcome",
                            if delivered == outcomes.len() {
                                "delivered"
                            } else if delivered > 0 {
                                "partial"
                            } else {
                                "refused"
                            },
                        );
                        if let Some(code) = outcomes.iter().find_map(Outcome::reply_code) {
                            span.record("smtp.reply.code", code);
                        }
                    }
                    Err(HostError::Busy) => {
                        span.record("outcome", "busy");
                    }
                    Err(HostError::Session(_)) => {
                        span.record("outcome", "error");
                    }
                }
                match tried {
                    Ok(outcomes) => return outcomes,
                    // Connections per host are shared by every delivery
                    // pod; a host that stays busy is passed over, and if
                    // all are, the message waits in a retry tier.
                    Err(HostError::Busy) => {
                        last = Outcome::temp(
                            "4.4.5",
                            format!("{} is at its connection limit; waiting", hop.host),
                        );
                    }
                    Err(HostError::Session(e)) => {
                        tracing::info!(queue_id = %msg.queue_id, mx = %hop.host, %addr, error = %e, "next hop failed; trying the next");
                        let status = match e {
                            client::SessionError::TlsRequired(_) => "4.7.5",
                            client::SessionError::Auth(_) => "4.7.8",
                            _ => "4.4.1",
                        };
                        last = Outcome::temp(status, format!("{} ({addr}): {e}", hop.host));
                    }
                }
            }
        }
        vec![last; rcpts.len()]
    }

    /// MX hops of a domain with an MTA-STS policy: in `enforce` mode only
    /// the hosts it names, each with verified TLS; in `testing` mode the
    /// same hops, with the ones it would refuse logged. A configured route
    /// is the operator's word and is left alone.
    async fn apply_mta_sts(
        &self,
        queue_id: &str,
        domain: &str,
        mut hops: Vec<route::Hop>,
    ) -> Result<Vec<route::Hop>, Outcome> {
        let Some(sts) = &self.mta_sts else {
            return Ok(hops);
        };
        if hops.iter().any(|h| h.route.is_some()) {
            return Ok(hops);
        }
        let Some(policy) = sts.policy(domain).await else {
            return Ok(hops);
        };
        match policy.mode {
            mta_sts::Mode::None => {}
            mta_sts::Mode::Testing => {
                for h in hops.iter().filter(|h| !policy.names(&h.host)) {
                    tracing::warn!(%queue_id, %domain, mx = %h.host, "MX not in the domain's MTA-STS policy (testing mode: delivering anyway)");
                }
            }
            mta_sts::Mode::Enforce => {
                hops.retain(|h| policy.names(&h.host));
                if hops.is_empty() {
                    return Err(Outcome::temp(
                        "4.7.5",
                        format!("no MX host of {domain} is named in its MTA-STS policy"),
                    ));
                }
                for h in &mut hops {
                    h.tls = Some(OutboundTls::Required);
                }
            }
        }
        Ok(hops)
    }

    fn policy(&self, hop: &route::Hop) -> &tls::TlsPolicy {
        match hop.tls.unwrap_or(self.tls_default) {
            OutboundTls::None => &tls::TlsPolicy::None,
            OutboundTls::Opportunistic => &self.opportunistic,
            OutboundTls::Required => &self.required,
        }
    }

    async fn try_host(
        &self,
        msg: &QueuedMessage,
        content: &[u8],
        hop: &route::Hop,
        addr: std::net::SocketAddr,
        rcpts: &[usize],
    ) -> Result<Vec<Outcome>, HostError> {
        let params: Vec<client::RcptParams> = rcpts
            .iter()
            .map(|&i| {
                let r = &msg.recipients[i];
                client::RcptParams {
                    address: &r.address,
                    notify: &r.notify,
                    orcpt: &r.orcpt,
                }
            })
            .collect();
        let t = Transaction {
            sender: &msg.sender,
            recipients: &params,
            content,
            smtputf8: msg.smtputf8,
            ret: &msg.dsn_ret,
            envid: &msg.dsn_envid,
        };
        let key = pool::Key {
            addr,
            host: hop.host.clone(),
            route: hop.route.as_ref().map(|r| format!("{r:?}")),
            tls: hop.tls,
        };
        // A connection kept from an earlier message, if one is fresh, with
        // its lease; one that fails before any reply is simply dropped for
        // a new one.
        if let Some(mut kept) = self.pool.take(&key) {
            if !self.leases.renew(&mut kept.lease).await {
                tracing::debug!(mx = %hop.host, "a kept connection's lease had expired; closing it");
                kept.client.quit().await;
            } else {
                match kept.client.deliver(&t).await {
                    Ok(outcomes) => {
                        self.keep_or_quit(key, kept).await;
                        return Ok(outcomes);
                    }
                    Err(e) if kept.client.body_sent() => {
                        // The server may have the message: no second copy
                        // now; the retry tiers decide.
                        self.release(kept.lease).await;
                        return Err(e.into());
                    }
                    Err(e) => {
                        tracing::debug!(mx = %hop.host, error = %e, "a kept connection had gone stale; reconnecting");
                        self.release(kept.lease).await;
                    }
                }
            }
        }
        let lease = self.lease(&hop.host).await.ok_or(HostError::Busy)?;
        match self.connect(hop, addr).await {
            Ok(mut client) => match client.deliver(&t).await {
                Ok(outcomes) => {
                    self.keep_or_quit(key, pool::Kept { client, lease }).await;
                    Ok(outcomes)
                }
                Err(e) => {
                    self.release(lease).await;
                    Err(e.into())
                }
            },
            Err(e) => {
                self.release(lease).await;
                Err(e.into())
            }
        }
    }

    /// Opens a session with `hop` at `addr`: EHLO, STARTTLS as the hop's
    /// policy says, AUTH when its route has credentials.
    async fn connect(
        &self,
        hop: &route::Hop,
        addr: std::net::SocketAddr,
    ) -> Result<Client, client::SessionError> {
        let stream = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(client::SessionError::Timeout(self.connect_timeout)),
            Ok(r) => r?,
        };
        stream.set_nodelay(true)?;
        let mut c = Client::new(stream, &hop.host, self.timeouts);
        c.hello(&self.hostname, self.policy(hop)).await?;
        if let Some(route) = &hop.route
            && let (Some(user), Some(file)) = (&route.auth_user, &route.auth_password_file)
        {
            let password = tokio::fs::read_to_string(file).await?;
            c.authenticate(user, password.trim_end_matches(['\r', '\n']))
                .await?;
        }
        if let Some(tls) = &c.tls {
            tracing::debug!(mx = %hop.host, tls = %tls, "TLS on");
        }
        Ok(c)
    }

    /// A connection lease for `host`, waiting up to `LEASE_WAIT` for one
    /// to come free (a burst to one host queues here for seconds instead of
    /// going to a retry tier for minutes). Releases in this process wake
    /// the waiters at once; other pods' releases are seen on the next poll.
    async fn lease(&self, host: &str) -> Option<correu_runtime::limits::Lease> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            let freed = self.lease_freed.notified();
            if let Some(l) = self.leases.acquire("conn", host, self.max_per_host).await {
                return Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(LEASE_POLL) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn release(&self, lease: correu_runtime::limits::Lease) {
        self.leases.release(lease).await;
        self.lease_freed.notify_waiters();
    }

    /// After a transaction: RSET and keep the connection, lease and all,
    /// for the next message to the same host; QUIT when the pool is full.
    async fn keep_or_quit(&self, key: pool::Key, mut k: pool::Kept) {
        if k.client.reset().await.is_err() {
            self.release(k.lease).await;
            return;
        }
        if let Some(k) = self.pool.put(key, k) {
            k.client.quit().await;
            self.release(k.lease).await;
        }
    }

    /// Closes kept connections idle past `connection_idle` (all of them
    /// when `everything`), giving their leases back.
    async fn close_kept(&self, everything: bool) {
        let out = if everything {
            self.pool.drain()
        } else {
            self.pool.sweep()
        };
        for k in out {
            k.client.quit().await;
            self.release(k.lease).await;
        }
    }

    async fn settle(&self, delivery: Delivery, msg: QueuedMessage, outcomes: Vec<Outcome>) {
        let id = msg.queue_id.clone();
        let attempts = msg.attempt + 1;
        let age = age_of(msg.received_at_unix_micros);
        let pending_any = outcomes.iter().any(Outcome::is_temporary);
        let next = if pending_any {
            Some(self.schedule.next(attempts, age))
        } else {
            None
        };
        let giving_up = next == Some(Next::GiveUp);
        // One delay warning per message, once it is old enough.
        let warn_delay = pending_any
            && !giving_up
            && !self.delay_warning.is_zero()
            && !msg.delay_warned
            && age >= self.delay_warning;
        let mut pending = Vec::new();
        let mut last_error = String::new();
        let mut reports: Vec<(&correu_proto::v1::Recipient, dsn::Action)> = Vec::new();
        let m = &metrics::METRICS;
        for (r, o) in msg.recipients.iter().zip(&outcomes) {
            let destination = if self.is_local(&r.address) {
                "local"
            } else {
                "remote"
            };
            let outcome = match o {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Permanent(_) => "failed",
                Outcome::Temporary(_) if giving_up => "failed",
                Outcome::Temporary(_) => "deferred",
            };
            m.attempts.add(
                1,
                &[
                    KeyValue::new("outcome", outcome),
                    KeyValue::new("destination", destination),
                ],
            );
            match o {
                Outcome::Delivered { remote_mta } => {
                    m.time_to_deliver.record(
                        age.as_secs_f64(),
                        &[KeyValue::new("destination", destination)],
                    );
                    tracing::info!(queue_id = %id, recipient = %r.address, attempt = attempts, "delivered");
                    let action = match remote_mta {
                        Some(m) => dsn::Action::Relayed {
                            remote_mta: m.clone(),
                        },
                        None => dsn::Action::Delivered,
                    };
                    reports.push((r, action));
                }
                Outcome::Permanent(f) => {
                    tracing::warn!(queue_id = %id, recipient = %r.address, reason = %f, "delivery failed permanently");
                    reports.push((r, dsn::Action::Failed(f.clone())));
                }
                Outcome::Temporary(f) if giving_up => {
                    tracing::warn!(queue_id = %id, recipient = %r.address, reason = %f, attempts, ?age, "maximum age reached; giving up");
                    reports.push((r, dsn::Action::Failed(f.clone())));
                }
                Outcome::Temporary(f) => {
                    tracing::info!(queue_id = %id, recipient = %r.address, reason = %f, "delivery deferred");
                    last_error = f.to_string();
                    pending.push(r.clone());
                    if warn_delay {
                        reports.push((r, dsn::Action::Delayed(f.clone())));
                    }
                }
            }
        }
        // The report is queued (durably) before the message is settled.
        if self.bounces {
            let dsn_id = correu_queue::new_queue_id();
            let now = age_of(0).as_micros() as i64;
            if let Some(mut report) = dsn::build(&self.hostname, &msg, &reports, &dsn_id, now) {
                // The report belongs to the message's trace.
                report.traceparent = correu_runtime::telemetry::inject()
                    .remove("traceparent")
                    .unwrap_or_default();
                match self.queue.publish(&report).await {
                    Ok(()) => {
                        m.reports.add(1, &[]);
                        tracing::info!(queue_id = %id, dsn = %dsn_id, to = %msg.sender, "delivery status notification queued")
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot queue the DSN; the message goes back to the queue");
                        return self.log_settle(&id, delivery.release().await);
                    }
                }
            }
        }
        drop(reports);
        let was_deferred = msg.attempt > 0;
        let result = match next {
            Some(Next::RetryIn { tier, delay }) if !pending.is_empty() => {
                tracing::info!(queue_id = %id, attempts, retry_in = ?delay, pending = pending.len(), "retry scheduled");
                m.retries.add(1, &[]);
                let updated = QueuedMessage {
                    recipients: pending,
                    attempt: attempts,
                    last_error,
                    delay_warned: msg.delay_warned || warn_delay,
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
            _ => delivery.ack().await,
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

/// Why a host got no transaction.
enum HostError {
    /// At its connection limit.
    Busy,
    Session(client::SessionError),
}

impl From<client::SessionError> for HostError {
    fn from(e: client::SessionError) -> Self {
        HostError::Session(e)
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
    let deliverer = Arc::new(Deliverer::new(cfg, queue.clone(), storage)?);
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
    let queue = correu_queue::open_for_service(&cfg.queue).await?;
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
