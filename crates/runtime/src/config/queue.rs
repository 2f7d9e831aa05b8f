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
    /// Time to hand a new message to the broker and have it confirmed in
    /// the ordinary course: connecting, the channel and the confirm all
    /// count. A message not yet handed over by then gets `451` at once;
    /// while one handed over is still unconfirmed past it, new messages
    /// are refused (`451`) without being sent.
    pub publish_timeout: Dur,
    /// How long a message handed to the broker may wait for its confirm,
    /// the client waiting for its reply meanwhile (RFC 5321 §4.5.3.2.6
    /// gives clients 10 minutes after the end of DATA). Past it the
    /// message is withdrawn (a record in Redis that delivery checks) and
    /// the client gets `451`; without `redis.url` it cannot be withdrawn
    /// and may still be delivered.
    pub confirm_timeout: Dur,
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
            confirm_timeout: Dur::secs(300),
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
        } else if let Err(why) = url_authority(&q.url) {
            c.err("queue.url", why);
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
        if q.confirm_timeout.get() < q.publish_timeout.get() {
            c.err(
                "queue.confirm_timeout",
                "must be at least queue.publish_timeout",
            );
        }
    }
}

/// The host part of a broker URL must be one a client can connect to: the
/// connection is made lazily, so a malformed URL (`amqp://u:p@[bad`) would
/// otherwise pass the start and fail every publish. The password is never
/// repeated in the message.
pub(crate) fn url_authority(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("is not a valid URL: {e}"))?;
    let Some(authority) = uri.authority() else {
        return Err("names no host".into());
    };
    if authority.host().is_empty() {
        return Err("names no host".into());
    }
    // `host:port` whose port is not a number parses with no port at all.
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    let after_host = host_port.rsplit(']').next().unwrap_or_default();
    if after_host.contains(':') && authority.port_u16().is_none() {
        return Err("has a port that is not a number".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_must_name_a_host() {
        for good in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://correu:s3cret@rabbitmq.mail.svc:5671/mail",
            "amqp://rabbitmq",
            "amqp://u:p@[::1]:5672/%2f",
        ] {
            assert_eq!(url_authority(good), Ok(()), "{good}");
        }
        for bad in [
            "amqp://guest:guest@[bad/%2f",
            "amqp://",
            "amqp:///vhost",
            "amqp://u:p@host:port/x",
        ] {
            let e = url_authority(bad).unwrap_err();
            assert!(!e.contains("guest"), "{e}");
        }
    }
}
