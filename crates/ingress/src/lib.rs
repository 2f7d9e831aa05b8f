//! The ingress service: Correu's SMTP front end.
//!
//! It accepts connections, runs SMTP sessions, checks local recipients with
//! storage over gRPC, refuses relaying for clients outside the trusted
//! networks, and publishes each message to the queue, answering `250` only
//! once the queue holds it durably.
//!
//! # Layout
//! - [`run`]: listeners, the connection limit and graceful shutdown.
//! - [`session`]: one SMTP session over any stream (TCP here, memory in tests).
#![forbid(unsafe_code)]

pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use correu_queue::Queue;
use correu_runtime::Config;
use correu_runtime::config::Network;
use correu_smtp::session::SessionConfig;
use correu_storage::client::Client;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every session of one ingress shares.
pub struct Shared {
    pub session: Arc<SessionConfig>,
    pub trusted: Vec<Network>,
    pub queue: Queue,
    pub storage: Client,
    pub max_line: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub recipient_check_timeout: Duration,
    /// Cancelled when the server stops: idle sessions get `421 4.3.2`.
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn new(cfg: &Config, queue: Queue, storage: Client, shutdown: CancellationToken) -> Self {
        Shared {
            session: Arc::new(SessionConfig {
                hostname: cfg.hostname.clone(),
                local_domains: cfg.domains.iter().map(|d| d.to_lowercase()).collect(),
                max_message_size: usize::try_from(cfg.smtp.max_message_size).unwrap_or(usize::MAX),
                max_recipients: cfg.smtp.max_recipients,
                max_errors: cfg.smtp.max_errors,
            }),
            trusted: cfg.smtp.trusted_networks.clone(),
            queue,
            storage,
            max_line: cfg.smtp.max_line_length,
            command_timeout: cfg.smtp.command_timeout.get(),
            data_timeout: cfg.smtp.data_timeout.get(),
            recipient_check_timeout: cfg.smtp.recipient_check_timeout.get(),
            shutdown,
        }
    }
}

/// Serves SMTP on `listeners` until `shutdown` is cancelled, then lets the
/// sessions in progress finish for up to `smtp.shutdown_grace`.
pub async fn run(
    cfg: &Config,
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(cfg.smtp.max_connections));
    let tracker = TaskTracker::new();
    let shutdown = shared.shutdown.clone();
    for listener in listeners {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "SMTP listening");
        tracker.spawn(accept_loop(
            listener,
            shared.clone(),
            limit.clone(),
            tracker.clone(),
        ));
    }
    shutdown.cancelled().await;
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
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
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
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    serve(&shared, stream, peer).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracker.spawn(refuse(stream, shared.session.hostname.clone()));
            }
        }
    }
}

/// Over the connection limit: say so (RFC 5321 §3.8) and close.
async fn refuse(mut stream: TcpStream, host: String) {
    let reply = format!("421 4.3.2 {host} Too many connections, try again later\r\n");
    let sent =
        tokio::time::timeout(Duration::from_secs(5), stream.write_all(reply.as_bytes())).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("could not tell a refused client why");
    }
}

async fn serve(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("smtp.session", client = %peer);
    let result =
        tracing::Instrument::instrument(session::run_session(shared, stream, peer), span).await;
    match result {
        Ok(end) => tracing::debug!(client = %peer, ?end, "session ended"),
        Err(e) => tracing::debug!(client = %peer, error = %e, "session failed"),
    }
}

/// Binds every `smtp.listen` address, naming the one that fails.
pub async fn bind(cfg: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in &cfg.smtp.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (smtp.listen): {e}"))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// The ingress service on its own: RabbitMQ (unless configured otherwise)
/// and storage at `storage.endpoint`.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = bind(&cfg).await?;
    let queue = correu_queue::open_for_service(&cfg.queue).await?;
    let storage = correu_storage::client::connect(&cfg.storage, &cfg.storage.endpoint)?;
    let shared = Arc::new(Shared::new(&cfg, queue, storage, shutdown));
    run(&cfg, listeners, shared).await
}
