//! What `correu queue` shows and does, for both backends: counts per
//! queue, the deferred and the parked messages, and the operator's actions
//! (retry now, delete, requeue what was parked).
//!
//! The spool's files are the truth and are read directly. RabbitMQ's retry
//! queues cannot be browsed without taking messages out, so the deferred
//! list there comes from an informational index in Redis
//! ([`crate::index`]), written by delivery when it schedules a retry; the
//! actions take the messages out of their queue, act, and let the broker
//! return the others.

use std::time::Duration;

use correu_proto::v1::QueuedMessage;
use prost::Message;

use crate::{Queue, QueueError};

/// Messages waiting in one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCount {
    pub name: String,
    pub messages: u64,
}

/// A message waiting for its next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferred {
    pub queue_id: String,
    /// Unix time in milliseconds of the next attempt.
    pub next_attempt_unix_ms: i64,
    pub attempts: u32,
    pub last_error: String,
    pub recipients: Vec<String>,
}

impl Deferred {
    pub fn from_message(msg: &QueuedMessage, next_attempt_unix_ms: i64) -> Deferred {
        Deferred {
            queue_id: msg.queue_id.clone(),
            next_attempt_unix_ms,
            attempts: msg.attempt,
            last_error: msg.last_error.clone(),
            recipients: msg.recipients.iter().map(|r| r.address.clone()).collect(),
        }
    }
}

/// A message kept aside for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// Empty when the message carries no id anywhere (a broken producer
    /// that set no `message_id`, and a body that does not decode).
    pub queue_id: String,
    pub reason: String,
    pub bytes: u64,
    /// Unix time in milliseconds when it was parked, when known.
    pub parked_at_unix_ms: Option<i64>,
}

/// Which messages an action applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which<'a> {
    All,
    Id(&'a str),
}

impl Which<'_> {
    pub(crate) fn matches(&self, id: &str) -> bool {
        match self {
            Which::All => true,
            Which::Id(want) => *want == id,
        }
    }

    /// Whether raw queue bytes are (or, undecodable, may be) this message.
    pub(crate) fn matches_raw(&self, raw: &[u8], header_id: Option<&str>) -> bool {
        match self {
            Which::All => true,
            Which::Id(want) => {
                header_id == Some(want)
                    || QueuedMessage::decode(raw).is_ok_and(|m| m.queue_id == *want)
            }
        }
    }
}

impl Queue {
    /// Messages per queue: work, each retry tier, parked.
    pub async fn counts(&self) -> Result<Vec<QueueCount>, QueueError> {
        match self {
            Queue::Amqp(q) => q.counts().await,
            Queue::Spool(s) => {
                // Directory listings: off the async threads.
                let spool = s.clone();
                let c = tokio::task::spawn_blocking(move || spool.counts())
                    .await
                    .map_err(|e| QueueError::Io(std::io::Error::other(e)))??;
                Ok(vec![
                    QueueCount {
                        name: "active".into(),
                        messages: c.active as u64,
                    },
                    QueueCount {
                        name: "deferred".into(),
                        messages: c.deferred as u64,
                    },
                    QueueCount {
                        name: "parked".into(),
                        messages: c.parked as u64,
                    },
                ])
            }
        }
    }

    /// The deferred messages, soonest first (spool: from its files;
    /// RabbitMQ: from the Redis index, when one is configured).
    pub async fn deferred(
        &self,
        index: Option<&crate::index::DeferredIndex>,
        limit: usize,
    ) -> Result<Vec<Deferred>, QueueError> {
        let mut list = match (self, index) {
            (Queue::Spool(s), _) => s.deferred()?,
            (Queue::Amqp(_), Some(index)) => index.list(limit).await?,
            (Queue::Amqp(_), None) => Vec::new(),
        };
        list.sort_by_key(|d| d.next_attempt_unix_ms);
        list.truncate(limit);
        Ok(list)
    }

    /// Moves deferred messages back to delivery now; returns how many.
    pub async fn retry_now(&self, which: Which<'_>) -> Result<usize, QueueError> {
        match self {
            Queue::Spool(s) => Ok(s.retry_now(which)?),
            Queue::Amqp(q) => {
                let mut n = 0;
                for (name, _) in q.topology().retry_queues.clone() {
                    n += q.sweep(&name, which, true).await?;
                }
                Ok(n)
            }
        }
    }

    /// Up to `limit` parked messages, with their reasons (spool: from
    /// `parked/`; RabbitMQ: looked at in the parked queue and given back).
    pub async fn parked(&self, limit: usize) -> Result<Vec<Parked>, QueueError> {
        let mut list = match self {
            Queue::Spool(s) => {
                let spool = s.clone();
                tokio::task::spawn_blocking(move || spool.parked())
                    .await
                    .map_err(|e| QueueError::Io(std::io::Error::other(e)))??
            }
            Queue::Amqp(q) => q.parked(limit).await?,
        };
        list.sort_by_key(|p| p.parked_at_unix_ms);
        list.truncate(limit);
        Ok(list)
    }

    /// Deletes a deferred or parked message, with its entry in the
    /// deferred index when one is given; returns how many copies were
    /// found in the queue. The index entry goes whatever that number:
    /// without the message it would only list a message that is gone.
    pub async fn delete(
        &self,
        id: &str,
        index: Option<&crate::index::DeferredIndex>,
    ) -> Result<usize, QueueError> {
        let n = self.delete_queued(id).await?;
        if let Some(index) = index {
            index.remove(id).await?;
        }
        Ok(n)
    }

    async fn delete_queued(&self, id: &str) -> Result<usize, QueueError> {
        match self {
            Queue::Spool(s) => Ok(s.delete(id)?),
            Queue::Amqp(q) => {
                let t = q.topology().clone();
                let mut n = 0;
                for (name, _) in &t.retry_queues {
                    n += q.sweep(name, Which::Id(id), false).await?;
                }
                n += q.sweep(&t.parked_queue, Which::Id(id), false).await?;
                Ok(n)
            }
        }
    }

    /// Gives parked messages back to delivery; returns how many.
    pub async fn requeue_parked(&self, which: Which<'_>) -> Result<usize, QueueError> {
        match self {
            Queue::Spool(s) => Ok(s.requeue_parked(which)?),
            Queue::Amqp(q) => {
                let parked = q.topology().parked_queue.clone();
                q.sweep(&parked, which, true).await
            }
        }
    }
}

/// How long a sweep waits for the next message before it is done.
pub(crate) const SWEEP_IDLE: Duration = Duration::from_secs(2);

/// The longest a sweep waits for messages the broker still says are ready
/// (a busy broker can take longer than [`SWEEP_IDLE`] to deliver them).
pub(crate) const SWEEP_PATIENCE: Duration = Duration::from_secs(30);
