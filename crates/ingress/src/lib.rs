//! The ingress service: Correu's SMTP front end.
//!
//! It accepts connections on three kinds of listener (MX, submission with
//! STARTTLS, implicit-TLS submission), runs SMTP sessions, checks local
//! recipients with storage over gRPC, authenticates submission users,
//! refuses relaying for everyone else, and publishes each message to the
//! queue, answering `250` only once the queue holds it durably.
//!
//! # Layout
//! - [`run`]: listeners, connection limits and graceful shutdown.
//! - [`session`]: one SMTP session over any stream (TCP here, memory in tests).
//! - [`tls`]: rustls configuration, reloading, the plain-or-TLS stream.
//! - [`auth`]: credential checks and the failed-login throttle.
//! - [`idle`]: which sessions are idle, so the idlest gives way when slots run out.
#![forbid(unsafe_code)]

pub mod auth;
pub mod blocklist;
pub mod greylist;
pub mod idle;
pub mod inbound;
pub mod metrics;
pub mod milter;
pub mod recipients;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use correu_queue::Queue;
use correu_runtime::Config;
use correu_runtime::config::{Network, Rate};
use correu_smtp::session::{Role, SessionConfig};
use correu_storage_client::Client;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::tls::Tls;
use correu_runtime::limits::{Concurrency, RateLimiter};

/// What every session of one ingress shares.
pub struct Shared {
    pub session: Arc<SessionConfig>,
    pub trusted: Vec<Network>,
    pub proxies: Vec<Network>,
    pub queue: Queue,
    pub storage: Client,
    pub tls: Option<Arc<Tls>>,
    pub auth: Option<Arc<dyn Authenticator>>,
    /// Envelope addresses may go into spans (`telemetry.span_addresses`).
    pub span_addresses: bool,
    pub per_client: Arc<Concurrency>,
    pub rates: RateLimiter,
    pub connection_rate: Rate,
    pub message_rate: Rate,
    pub user_message_rate: Rate,
    pub auth_throttle: auth::Throttle,
    pub max_line: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Octets per second a DATA or BDAT transfer must keep up, after
    /// `data_timeout` (0: the timeout applies to each read instead).
    pub min_data_rate: u64,
    pub tls_handshake_timeout: Duration,
    pub proxy_timeout: Duration,
    pub max_session_time: Duration,
    pub recipient_check_timeout: Duration,
    pub known_recipients: recipients::KnownRecipients,
    /// Cancelled when the server stops: idle sessions get `421 4.3.2`.
    pub shutdown: CancellationToken,
    /// The open sessions, for evicting the idlest when slots run out.
    pub sessions: Arc<idle::Sessions>,
    /// SPF, DKIM, ARC and DMARC on the MX port (`inbound.verify`).
    pub verifier: Option<Arc<inbound::Verifier>>,
    /// DNS blocklists (`inbound.blocklists`), on the MX port.
    pub blocklists: Option<Arc<blocklist::Blocklists>>,
    /// Greylisting (`inbound.greylist`), on the MX port.
    pub greylist: Option<Arc<greylist::Greylist>>,
    /// Milters (`inbound.milters`), each with the ports it serves.
    pub milters: Vec<correu_runtime::config::Milter>,
    /// The name of this server's `Authentication-Results`; such fields
    /// that come with a message are removed.
    pub authserv_id: String,
    /// The secret SRS addresses are signed with (storage.srs_secret_file);
    /// `None`: forwarded mail keeps its sender.
    pub srs_secret: Option<Vec<u8>>,
}

impl Shared {
    /// Everything a session needs, from the configuration. Fails when the
    /// certificate or the accounts file cannot be read.
    pub fn new(
        cfg: &Config,
        queue: Queue,
        storage: Client,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let s = &cfg.smtp;
        let tls = match (&s.tls_certificate, &s.tls_key) {
            (Some(cert), Some(key)) => Some(Tls::new(cert, key)?),
            _ => None,
        };
        // AUTH checks the password file when one is set, else storage's
        // accounts (storage.accounts_file) through its Authenticate call.
        let auth: Option<Arc<dyn Authenticator>> = match &s.auth_file {
            Some(path) => Some(Arc::new(Arc::new(auth::PasswordFile::open(path).map_err(
                |e| anyhow::anyhow!("cannot read {} (smtp.auth_file): {e}", path.display()),
            )?))),
            None => Some(Arc::new(auth::StorageAccounts {
                client: storage.clone(),
            })),
        };
        let srs_secret = match &cfg.storage.srs_secret_file {
            Some(path) => {
                // Read once at start, before the runtime serves anything.
                #[allow(clippy::disallowed_methods)]
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read {} (storage.srs_secret_file): {e}",
                        path.display()
                    )
                })?;
                let secret = text.trim();
                if secret.len() < 16 {
                    anyhow::bail!(
                        "storage.srs_secret_file: the secret in {} is shorter than 16 characters",
                        path.display()
                    );
                }
                Some(secret.as_bytes().to_vec())
            }
            None => None,
        };
        Ok(Shared {
            srs_secret,
            span_addresses: cfg.telemetry.span_addresses,
            session: Arc::new(SessionConfig {
                hostname: cfg.hostname.clone(),
                local_domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
                max_message_size: usize::try_from(s.max_message_size).unwrap_or(usize::MAX),
                max_recipients: s.max_recipients,
                max_errors: s.max_errors,
                max_transactions: s.max_transactions,
                max_text_line: s.max_text_line,
                reject_bare_line_ends: s.reject_bare_line_ends,
                max_hops: s.max_hops,
            }),
            trusted: s.trusted_networks.clone(),
            proxies: s.proxy_networks.clone(),
            queue,
            storage,
            tls,
            auth,
            per_client: Concurrency::new(s.max_connections_per_client),
            rates: RateLimiter::new(&cfg.redis)?,
            connection_rate: s.connection_rate,
            message_rate: s.message_rate,
            user_message_rate: s.user_message_rate,
            auth_throttle: auth::Throttle {
                base: s.auth_failure_delay.get(),
                per_client: s.auth_client_failures,
                per_account: s.auth_account_failures,
            },
            max_line: s.max_line_length,
            command_timeout: s.command_timeout.get(),
            data_timeout: s.data_timeout.get(),
            min_data_rate: s.min_data_rate,
            tls_handshake_timeout: s.tls_handshake_timeout.get(),
            proxy_timeout: s.proxy_timeout.get(),
            max_session_time: s.max_session_time.get(),
            recipient_check_timeout: s.recipient_check_timeout.get(),
            known_recipients: recipients::KnownRecipients::new(s.recipient_cache.get()),
            shutdown,
            sessions: Arc::new(idle::Sessions::default()),
            blocklists: blocklist::Blocklists::new(
                &cfg.inbound,
                correu_runtime::dns::resolver(&cfg.dns)?,
            )
            .map(Arc::new),
            greylist: greylist::Greylist::new(
                &cfg.inbound.greylist,
                &cfg.redis,
                correu_runtime::redis::pool(&cfg.redis)?,
            )
            .map(Arc::new),
            milters: cfg.inbound.milters.clone(),
            verifier: if cfg.inbound.verify {
                Some(Arc::new(inbound::Verifier::new(cfg)?))
            } else {
                None
            },
            authserv_id: cfg
                .inbound
                .authserv_id
                .clone()
                .unwrap_or_else(|| cfg.hostname.clone()),
        })
    }
}

/// A bound listener and the role of its port.
pub struct Listener {
    pub socket: TcpListener,
    pub role: Role,
}

/// Binds every configured listener, naming the one that fails.
pub async fn bind(cfg: &Config) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    let s = &cfg.smtp;
    for (key, addrs, role) in [
        ("smtp.listen", &s.listen, Role::Mx),
        ("smtp.submission", &s.submission, Role::Submission),
        ("smtp.submissions", &s.submissions, Role::Submissions),
    ] {
        for addr in addrs {
            let socket = listen(*addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}"))?;
            listeners.push(Listener { socket, role });
        }
    }
    Ok(listeners)
}

/// Connections the kernel may hold for us before we accept them (it caps
/// this at `net.core.somaxconn`). A thousand clients connecting at once
/// overflowed the usual 1,024: their SYNs were dropped and they waited a
/// second or more to try again.
const ACCEPT_BACKLOG: u32 = 8192;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart may rebind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves SMTP on `listeners` until `shutdown` is cancelled, then lets the
/// sessions in progress finish for up to `smtp.shutdown_grace`.
pub async fn run(
    cfg: &Config,
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    metrics::init();
    let limit = Arc::new(Semaphore::new(cfg.smtp.max_connections));
    let tracker = TaskTracker::new();
    let shutdown = shared.shutdown.clone();
    if let Some(tls) = &shared.tls {
        let watcher = tls.clone().watch(shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = watcher.await {
                tracing::error!(error = %e, "certificate watcher failed");
            }
        });
    }
    // The listeners stay open through the drain, answering new
    // connections `421 4.3.2` (a load balancer may still send some), and
    // close once the sessions are done.
    let stop_accepting = tokio_util::sync::CancellationToken::new();
    let mut accepting = Vec::new();
    for l in listeners {
        let addr = l.socket.local_addr()?;
        let role = format!("{:?}", l.role).to_lowercase();
        tracing::info!(%addr, role, "SMTP listening");
        accepting.push(tokio::spawn(accept_loop(
            l,
            shared.clone(),
            limit.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        )));
    }
    shutdown.cancelled().await;
    let stopping = tokio::time::Instant::now();
    tracker.close();
    let grace = cfg.smtp.shutdown_grace.get();
    tracing::info!(
        sessions = tracker.len(),
        ?grace,
        "ingress stopping: no new sessions"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "sessions still open after the grace period; closing them"
        );
    }
    // Whatever the sessions did, the ports answer `421 4.3.2` until the
    // load balancers had time to see this pod leave.
    let linger = cfg
        .smtp
        .drain_delay
        .get()
        .saturating_sub(stopping.elapsed());
    if !linger.is_zero() {
        tracing::info!(?linger, "listeners answer 421 until the drain delay ends");
        tokio::time::sleep(linger).await;
    }
    stop_accepting.cancel();
    for a in accepting {
        let _ = a.await;
    }
    Ok(())
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little
                // rather than spin on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let role = listener.role;
        if shared.shutdown.is_cancelled() {
            metrics::METRICS.connections_refused.add(
                1,
                &[opentelemetry::KeyValue::new("reason", "shutting_down")],
            );
            tokio::spawn(refuse(
                stream,
                role,
                shared.session.shutting_down().to_bytes(),
            ));
            continue;
        }
        let permit = match limit.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            // Every slot is taken: the session idle longest gives way,
            // and this client waits for its slot while it says goodbye.
            Err(_) if shared.sessions.evict_idlest(idle::EVICT_AFTER) => {
                metrics::METRICS.sessions_evicted.add(1, &[]);
                None
            }
            Err(_) => {
                metrics::METRICS.connections_refused.add(
                    1,
                    &[opentelemetry::KeyValue::new("reason", "connection_limit")],
                );
                tracker.spawn(refuse(
                    stream,
                    role,
                    shared.session.too_many_connections().to_bytes(),
                ));
                continue;
            }
        };
        let shared = shared.clone();
        let limit = limit.clone();
        tracker.spawn(async move {
            let permit = match permit {
                Some(p) => p,
                None => match tokio::time::timeout(EVICTION_WAIT, limit.acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        metrics::METRICS.connections_refused.add(
                            1,
                            &[opentelemetry::KeyValue::new("reason", "connection_limit")],
                        );
                        let reply = shared.session.too_many_connections().to_bytes();
                        return refuse(stream, role, reply).await;
                    }
                },
            };
            metrics::METRICS.connections_accepted.add(1, &[]);
            serve(&shared, stream, peer, role).await;
            drop(permit);
        });
    }
}

/// How long a new client waits for the slot of an evicted idle session.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// Over a limit: say so (RFC 5321 §3.8) and close. On an implicit-TLS
/// port nothing is said: a reply in the clear is not what the client
/// expects there (it would read it as a broken handshake), and a server
/// out of slots should not spend a handshake on saying so.
async fn refuse(mut stream: TcpStream, role: Role, reply: Vec<u8>) {
    if role == Role::Submissions {
        return;
    }
    let sent = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&reply)).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("could not tell a refused client why");
    }
}

async fn serve(shared: &Shared, stream: TcpStream, peer: SocketAddr, role: Role) {
    // The session's span; each message gets a trace of its own (see
    // `smtp.transaction`), linked to this one.
    let span = tracing::info_span!(
        "smtp.session",
        client = %peer,
        "otel.kind" = "server",
        "client.address" = %peer.ip(),
        "client.port" = i64::from(peer.port()),
        "network.protocol.name" = "smtp",
        "otel.status_description" = tracing::field::Empty,
        "smtp.helo" = tracing::field::Empty,
        "tls.protocol.version" = tracing::field::Empty,
        "enduser.id" = tracing::field::Empty,
    );
    metrics::METRICS.connections_open.add(1, &[]);
    let result = tracing::Instrument::instrument(
        session::run_session(shared, stream, peer, role),
        span.clone(),
    )
    .await;
    metrics::METRICS.connections_open.add(-1, &[]);
    match result {
        Ok(end) => tracing::debug!(client = %peer, ?end, "session ended"),
        Err(e) => {
            span.record("otel.status_description", e.to_string().as_str());
            tracing::debug!(client = %peer, error = %e, "session failed");
        }
    }
}

/// The ingress service on its own: RabbitMQ (unless configured otherwise)
/// and storage at `storage.endpoint`.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = bind(&cfg).await?;
    let queue = correu_queue::open_for_service(&cfg.queue, &cfg.redis).await?;
    let storage = correu_storage_client::connect(&cfg.storage, &cfg.storage.endpoint)?;
    let health = correu_runtime::health::Health::new(shutdown.clone())
        .check("queue", correu_queue::ready_check(queue.clone()))
        .advisory(
            "storage",
            correu_storage_client::ready_check(storage.clone()),
        );
    let shared = Arc::new(Shared::new(&cfg, queue, storage, shutdown)?);
    let (probes, _) = correu_runtime::health::start(&cfg, health).await?;
    let result = run(&cfg, listeners, shared).await;
    probes.cancel();
    result
}
