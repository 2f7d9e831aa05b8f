//! `correu queue`: where is my mail? Counts per queue, the deferred
//! messages with their next attempt and last error, and the operator's
//! actions, on RabbitMQ or on `correu serve`'s spool.

use clap::Subcommand;
use correu_queue::Queue;
use correu_queue::admin::Which;
use correu_queue::index::DeferredIndex;
use correu_runtime::Config;
use correu_runtime::config::QueueBackend;

#[derive(Subcommand)]
pub enum Action {
    /// Messages per queue (the default).
    Status,
    /// The deferred messages, soonest first; with --parked, the parked
    /// ones and why.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// List the parked messages (with their reasons) instead.
        #[arg(long)]
        parked: bool,
    },
    /// Try deferred messages now: one by its queue id, or all.
    Retry { id: Option<String> },
    /// Delete a deferred or parked message.
    Delete { id: String },
    /// Give parked messages back to delivery: one by its id, or all.
    Requeue { id: Option<String> },
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

pub async fn run(cfg: Config, action: Option<Action>) -> anyhow::Result<()> {
    // Like `correu serve`, the spool unless the config says RabbitMQ.
    let backend = cfg.queue_backend(QueueBackend::Embedded);
    let queue = Queue::open_for_admin(&cfg.queue, backend).await?;
    let place = match backend {
        QueueBackend::Rabbitmq => format!("RabbitMQ at {}", redact(&cfg.queue.url)),
        QueueBackend::Embedded => format!("spool at {}", cfg.queue.spool.display()),
    };
    match action.unwrap_or(Action::Status) {
        Action::Status => {
            println!("queue: {place}");
            for c in queue.counts().await? {
                println!("  {:<28} {:>8}", c.name, c.messages);
            }
        }
        Action::List {
            limit,
            parked: true,
        } => {
            let list = queue.parked(limit).await?;
            if list.is_empty() {
                println!("no parked messages ({place})");
            }
            for p in &list {
                let id = if p.queue_id.is_empty() {
                    "(no id)"
                } else {
                    p.queue_id.as_str()
                };
                let when = p.parked_at_unix_ms.map_or(String::new(), |ms| {
                    format!("  parked {}", correu_smtp::headers::rfc5322_date(ms / 1000))
                });
                println!("{id}  {} bytes{when}", p.bytes);
                println!("    reason: {}", p.reason);
            }
            if list.len() == limit {
                println!("(the first {limit}; more with --limit)");
            }
        }
        Action::List {
            limit,
            parked: false,
        } => {
            let index = DeferredIndex::new(&cfg.redis)?;
            if backend == QueueBackend::Rabbitmq && index.is_none() {
                println!(
                    "RabbitMQ's retry queues cannot be listed without an index: set redis.url (counts: correu queue status)"
                );
                return Ok(());
            }
            let list = queue.deferred(index.as_ref(), limit).await?;
            if list.is_empty() {
                println!("no deferred messages ({place})");
            }
            for d in list {
                let when = correu_smtp::headers::rfc5322_date(d.next_attempt_unix_ms / 1000);
                println!(
                    "{}  next {}  attempts {}  to {}",
                    d.queue_id,
                    when,
                    d.attempts,
                    d.recipients.join(", ")
                );
                if !d.last_error.is_empty() {
                    println!("    last error: {}", d.last_error);
                }
            }
        }
        Action::Retry { id } => {
            let which = id.as_deref().map_or(Which::All, Which::Id);
            let n = queue.retry_now(which).await?;
            println!("{n} message(s) handed back to delivery");
        }
        Action::Delete { id } => {
            // The deferred index too, so `queue list` no longer shows it.
            let index = DeferredIndex::new(&cfg.redis)?;
            let n = queue.delete(&id, index.as_ref()).await?;
            if n == 0 {
                anyhow::bail!("{id}: not found among deferred or parked messages");
            }
            println!("{id}: deleted");
        }
        Action::Requeue { id } => {
            let which = id.as_deref().map_or(Which::All, Which::Id);
            let n = queue.requeue_parked(which).await?;
            println!("{n} parked message(s) handed back to delivery");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            super::redact("amqp://guest:secret@mq:5672/%2f"),
            "amqp://guest:***@mq:5672/%2f"
        );
        assert_eq!(super::redact("amqp://mq/%2f"), "amqp://mq/%2f");
    }
}
