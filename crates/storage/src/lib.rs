//! The storage service: mailboxes in Maildir behind a gRPC API.
//!
//! Delivery calls `Deliver` for local recipients; ingress calls
//! `CheckRecipient` at RCPT time; operators and tools list and read
//! messages. Maildir is what Dovecot reads, so IMAP and POP3 can be served
//! over the same volume.
//!
//! # Layout
//! - [`accounts`]: accounts, aliases and catch-alls, from files reread
//!   when they change.
//! - [`maildir`]: the mailboxes on disk (Dovecot's Maildir, Maildir++ quota).
//! - [`service`]: the tonic service and the error-to-status mapping.
//! - [`client`]: how the other services call storage (the
//!   correu-storage-client crate, re-exported); [`local_client`] answers
//!   its calls in this process.
#![forbid(unsafe_code)]

pub mod accounts;
pub use correu_storage_client::client;
pub mod maildir;
pub mod metrics;
pub mod service;

use std::sync::Arc;

use correu_proto::v1::storage_server::StorageServer;
use correu_runtime::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use maildir::Mailboxes;

/// The mailboxes the configuration describes; fails when the accounts or
/// aliases file cannot be read (naming its setting).
pub fn mailboxes(cfg: &Config) -> anyhow::Result<Mailboxes> {
    let st = &cfg.storage;
    let accounts = match &st.accounts_file {
        Some(p) => Some(
            accounts::Watched::open(p, "accounts", accounts::parse_accounts).map_err(|e| {
                anyhow::anyhow!("storage.accounts_file: cannot read {}: {e}", p.display())
            })?,
        ),
        None => None,
    };
    let aliases = match &st.aliases_file {
        Some(p) => Some(
            accounts::Watched::open(p, "aliases", accounts::parse_aliases).map_err(|e| {
                anyhow::anyhow!("storage.aliases_file: cannot read {}: {e}", p.display())
            })?,
        ),
        None => None,
    };
    let directory = accounts::Directory::new(
        &cfg.domains,
        accounts,
        aliases,
        &st.mailboxes,
        st.default_quota.0,
    );
    Ok(Mailboxes::new(&st.root, &cfg.hostname, directory))
}

/// The tonic service over `boxes`, taking requests up to `max_request`
/// bytes.
pub fn server(boxes: Arc<Mailboxes>, max_request: usize) -> StorageServer<service::StorageService> {
    StorageServer::new(service::StorageService::new(boxes)).max_decoding_message_size(max_request)
}

/// A client whose calls `boxes` answers in this process, without a socket
/// (`correu serve`): the same messages, codecs and status codes as over
/// HTTP/2.
pub fn local_client(
    cfg: &correu_runtime::config::StorageConfig,
    boxes: Arc<Mailboxes>,
) -> client::Client {
    use tonic::codegen::Service;
    let server = server(boxes, usize::MAX);
    let service: correu_storage_client::LocalService = Arc::new(move |req| {
        let mut s = server.clone();
        s.call(req)
    });
    correu_storage_client::local(cfg, service)
}

/// Serves the storage API on `listener` until `shutdown` is cancelled;
/// calls in progress finish first.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(cfg, Arc::new(mailboxes(cfg)?), listener, shutdown).await
}

/// [`run`] over mailboxes the caller shares (`correu serve` answers its
/// own calls in process with the same ones).
pub async fn run_with(
    cfg: &Config,
    boxes: Arc<Mailboxes>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    correu_runtime::sync::create_private_dirs(boxes.root()).map_err(|e| {
        anyhow::anyhow!("cannot make {} (storage.root): {e}", boxes.root().display())
    })?;
    metrics::init(&boxes);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, root = %boxes.root().display(), "storage listening");
    // The standard health protocol (grpc.health.v1) and server reflection,
    // so grpcurl and Kubernetes' gRPC probes work without a .proto file.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<StorageServer<service::StorageService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(correu_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tokio::spawn(refresh_quotas(boxes.clone(), shutdown.clone()));
    let draining = shutdown.clone();
    tokio::spawn(async move {
        draining.cancelled().await;
        health_reporter
            .set_not_serving::<StorageServer<service::StorageService>>()
            .await;
    });
    tonic::transport::Server::builder()
        .timeout(cfg.storage.request_timeout.get())
        .add_service(health)
        .add_service(reflection)
        // A Deliver carries a whole message: allow the largest one ingress
        // accepts, plus room for the envelope.
        .add_service(server(
            boxes,
            cfg.smtp.max_message_size as usize + (1 << 20),
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    tracing::info!("storage stopped");
    Ok(())
}

/// Watches the accounts file for quota changes and rewrites the
/// `maildirsize` of the mailboxes concerned (see
/// [`Mailboxes::refresh_changed_quotas`]).
async fn refresh_quotas(boxes: Arc<Mailboxes>, shutdown: CancellationToken) {
    let mut seen = boxes.directory().accounts();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = boxes.directory().accounts();
        let (Some(before), Some(after)) = (seen.clone(), now.clone()) else {
            seen = now;
            continue;
        };
        if Arc::ptr_eq(&before, &after) {
            continue;
        }
        let b = boxes.clone();
        let _rewritten =
            tokio::task::spawn_blocking(move || b.refresh_changed_quotas(&before, &after)).await;
        seen = now;
    }
}

/// The storage service on its own: binds `storage.listen` and serves.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.storage.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (storage.listen): {e}",
            cfg.storage.listen
        )
    })?;
    let health = correu_runtime::health::Health::new(shutdown.clone())
        .check("mailboxes", writable_check(cfg.storage.root.clone()));
    let (probes, _) = correu_runtime::health::start(&cfg, health).await?;
    let result = run(&cfg, listener, shutdown).await;
    probes.cancel();
    result
}

/// Ready only while a file can be made, written, synced and removed under
/// `root`: a volume mounted read-only, full, or owned by another user fails
/// every `Deliver`, and such a pod must leave the Service rather than take
/// its share of the calls.
pub fn writable_check(root: std::path::PathBuf) -> correu_runtime::health::Check {
    std::sync::Arc::new(move || {
        let root = root.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || correu_runtime::sync::probe_writable(&root))
                .await
                .map_err(|e| format!("probe task failed: {e}"))?
        })
    })
}
