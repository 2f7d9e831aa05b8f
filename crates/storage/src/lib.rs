//! The storage service: mailboxes in Maildir behind a gRPC API.
//!
//! Delivery calls `Deliver` for local recipients; ingress calls
//! `CheckRecipient` at RCPT time; operators and tools list and read
//! messages. Maildir is what Dovecot reads, so IMAP and POP3 can be served
//! over the same volume.
//!
//! # Layout
//! - [`maildir`]: the mailboxes on disk, and who has one.
//! - [`service`]: the tonic service and the error-to-status mapping.
//! - [`client`]: how the other services connect to storage.
#![forbid(unsafe_code)]

pub mod client;
pub mod maildir;
pub mod service;

use std::sync::Arc;

use correu_proto::v1::storage_server::StorageServer;
use correu_runtime::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use maildir::Mailboxes;

/// The mailboxes the configuration describes.
pub fn mailboxes(cfg: &Config) -> Mailboxes {
    Mailboxes::new(
        &cfg.storage.root,
        &cfg.hostname,
        &cfg.domains,
        &cfg.storage.mailboxes,
    )
}

/// Serves the storage API on `listener` until `shutdown` is cancelled;
/// calls in progress finish first.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let boxes = Arc::new(mailboxes(cfg));
    std::fs::create_dir_all(boxes.root())?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, root = %boxes.root().display(), "storage listening");
    tonic::transport::Server::builder()
        .timeout(cfg.storage.request_timeout.get())
        .add_service(
            StorageServer::new(service::StorageService::new(boxes))
                // A Deliver carries a whole message: allow the largest one
                // ingress accepts, plus room for the envelope.
                .max_decoding_message_size(cfg.smtp.max_message_size as usize + (1 << 20)),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    tracing::info!("storage stopped");
    Ok(())
}

/// The storage service on its own: binds `storage.listen` and serves.
pub async fn standalone(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.storage.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.storage.listen))?;
    run(&cfg, listener, shutdown).await
}
