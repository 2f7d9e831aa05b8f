//! `correu serve`: every role in one process.
//!
//! The same service code as in Kubernetes, wired together locally: ingress
//! and delivery make the same gRPC calls to storage, answered in process
//! without a socket; storage also serves gRPC on `storage.listen` (for
//! `correu mailbox` and other tools); and the queue is the embedded spool unless
//! `queue.backend` says RabbitMQ. Stopping goes front to back: ingress stops
//! taking mail and finishes its sessions, then delivery settles what it
//! holds, then storage stops.

use std::sync::Arc;

use anyhow::Context;
use correu_queue::Queue;
use correu_runtime::Config;
use correu_runtime::config::QueueBackend;
use correu_smtp::session::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub async fn serve(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Bind everything before anything runs: a port in use stops the start.
    let smtp = correu_ingress::bind(&cfg).await?;
    let storage_listener = TcpListener::bind(cfg.storage.listen)
        .await
        .with_context(|| format!("cannot listen on {} (storage.listen)", cfg.storage.listen))?;
    let storage_addr = storage_listener.local_addr()?;
    let backend = cfg.queue_backend(QueueBackend::Embedded);
    let queue = Queue::open(&cfg.queue, backend, &cfg.redis)
        .await
        .with_context(|| format!("cannot open the queue at {}", cfg.queue.spool.display()))?;
    // Ingress and delivery call storage in this process; the gRPC port is
    // for `correu mailbox` and other tools.
    let boxes = Arc::new(correu_storage::mailboxes(&cfg)?);
    let storage = correu_storage::local_client(&cfg.storage, boxes.clone());

    // Certificates, accounts and the webhook's secret are read now: a bad
    // one stops the start.
    let hook = match cfg.webhook.urls.is_empty() {
        true => None,
        false => Some(Arc::new(correu_webhook::Webhook::new(&cfg)?)),
    };
    let shared = Arc::new(correu_ingress::Shared::new(
        &cfg,
        queue.clone(),
        storage.clone(),
        shutdown.clone(),
    )?);

    let health = correu_runtime::health::Health::new(shutdown.clone())
        .check("queue", correu_queue::ready_check(queue.clone()))
        .check(
            "storage",
            correu_storage::client::ready_check(storage.clone()),
        );
    let (probes, health_addr) = correu_runtime::health::start(&cfg, health).await?;

    print_banner(&cfg, &smtp, storage_addr, health_addr, backend)?;

    let storage_stop = CancellationToken::new();
    let delivery_stop = CancellationToken::new();
    let storage_task = {
        let (cfg, stop) = (cfg.clone(), storage_stop.clone());
        let boxes = boxes.clone();
        tokio::spawn(
            async move { correu_storage::run_with(&cfg, boxes, storage_listener, stop).await },
        )
    };
    let delivery_task = {
        let (cfg, queue, storage, stop) = (
            cfg.clone(),
            queue.clone(),
            storage.clone(),
            delivery_stop.clone(),
        );
        tokio::spawn(async move { correu_delivery::run(&cfg, queue, storage, stop).await })
    };
    // Events to post (`webhook.urls`): read from the queue, so stopping
    // them early loses nothing.
    let webhook_stop = CancellationToken::new();
    let webhook_task = hook.map(|hook| {
        let (queue, stop) = (queue.clone(), webhook_stop.clone());
        tokio::spawn(async move {
            correu_webhook::run(hook, queue, stop).await;
            Ok(())
        })
    });
    let ingress_task = {
        let cfg = cfg.clone();
        tokio::spawn(async move { correu_ingress::run(&cfg, smtp, shared).await })
    };

    // A role that stops on its own is a failure: stop the others too.
    let watch = |name: &'static str, r: Result<anyhow::Result<()>, tokio::task::JoinError>| match r
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
        Err(e) => Err(anyhow::anyhow!("{name} panicked: {e}")),
    };
    let ingress_result = watch("ingress", ingress_task.await);
    delivery_stop.cancel();
    let delivery_result = watch("delivery", delivery_task.await);
    webhook_stop.cancel();
    let webhook_result = match webhook_task {
        Some(t) => watch("webhook", t.await),
        None => Ok(()),
    };
    storage_stop.cancel();
    let storage_result = watch("storage", storage_task.await);
    probes.cancel();
    println!("Correu stopped.");
    ingress_result
        .and(delivery_result)
        .and(webhook_result)
        .and(storage_result)
}

fn print_banner(
    cfg: &Config,
    smtp: &[correu_ingress::Listener],
    storage: std::net::SocketAddr,
    health: std::net::SocketAddr,
    backend: QueueBackend,
) -> anyhow::Result<()> {
    let domains = cfg.domains.join(", ");
    println!("Correu is running.");
    for l in smtp {
        let what = match l.role {
            Role::Mx => format!("mail for: {domains}"),
            Role::Submission => "submission: STARTTLS, then AUTH".to_string(),
            Role::Submissions => "submission over implicit TLS, then AUTH".to_string(),
        };
        println!("  SMTP     {}  ({what})", l.socket.local_addr()?);
    }
    println!("  storage  {storage}  (gRPC)");
    println!("  health   http://{health}/readyz  (and /livez, /metrics)");
    match backend {
        QueueBackend::Embedded => {
            println!("  queue    {}  (embedded spool)", cfg.queue.spool.display())
        }
        QueueBackend::Rabbitmq => println!("  queue    RabbitMQ"),
    }
    println!(
        "  mail for USER@{} lands in {}/{}/USER/new/",
        cfg.domains[0],
        cfg.storage.root.display(),
        cfg.domains[0]
    );
    println!("Stop with Ctrl-C.");
    Ok(())
}
