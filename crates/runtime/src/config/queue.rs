//! `[queue]`: RabbitMQ for the services, the spool for `correu serve`, and
//! the retry schedule both follow.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::{Dur, one_or_many};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// RabbitMQ, for the services on their own (Kubernetes).
    Rabbitmq,
    /// A spool directory in the process, for `correu serve`.
    Embedded,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct QueueConfig {
    /// Default: `embedded` for `correu serve`, `rabbitmq` for the services.
    pub backend: Option<QueueBackend>,
    /// RabbitMQ's AMQP URL (vhost included).
    pub url: String,
    /// Prefix of every exchange and queue Correu declares.
    pub prefix: String,
    /// The embedded backend's spool directory.
    pub spool: PathBuf,
    /// Time for the broker to confirm a publish before the client gets `451`.
    pub publish_timeout: Dur,
    /// Time to connect to the broker.
    pub connect_timeout: Dur,
    /// Unacknowledged messages per delivery consumer.
    pub prefetch: u16,
    /// Delay before each retry, one retry tier each; the last repeats.
    #[serde(deserialize_with = "one_or_many")]
    pub retry_delays: Vec<Dur>,
    /// Age after which a message that still fails is given up.
    pub max_age: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: None,
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "correu".into(),
            spool: PathBuf::from("data/queue"),
            publish_timeout: Dur::secs(10),
            connect_timeout: Dur::secs(5),
            prefetch: 32,
            // Postfix-like: minutes first, then hours.
            retry_delays: [60, 300, 900, 1800, 3600, 7200, 14400]
                .into_iter()
                .map(Dur::secs)
                .collect(),
            max_age: Dur::secs(5 * 24 * 3600),
        }
    }
}

impl QueueConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        if !c.role.uses_queue() {
            return;
        }
        let q = self;
        if !(q.url.starts_with("amqp://") || q.url.starts_with("amqps://")) {
            c.err("queue.url", "must start with amqp:// or amqps://");
        }
        if q.prefix.is_empty()
            || !q
                .prefix
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            c.err("queue.prefix", "must be letters, digits, '-', '_' or '.'");
        }
        if q.prefetch == 0 {
            c.err("queue.prefetch", "must be more than 0");
        }
        if q.retry_delays.is_empty() {
            c.err("queue.retry_delays", "at least one delay is needed");
        }
        if q.publish_timeout.get().is_zero() {
            c.err("queue.publish_timeout", "must be more than 0");
        }
    }
}
