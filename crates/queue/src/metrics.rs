//! The queue's metrics: publish-confirm latency, broker errors, depths.

use std::sync::LazyLock;

use correu_runtime::metrics::{counter, histogram};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram};

use crate::admin::QueueCount;

pub struct QueueMetrics {
    /// From publish to the broker's confirm (or the spool's fsync).
    pub publish_duration: Histogram<f64>,
    /// Publishes and other broker operations that failed, by operation.
    pub errors: Counter<u64>,
    /// Messages per queue, as last read from the broker.
    pub depth: Gauge<u64>,
    /// New messages whose confirm never came, by `outcome`: `withdrawn`
    /// (the client got 451; never delivered), `delivering` (delivery had
    /// it; the client got 250), `unknown` (no Redis to withdraw it).
    pub unconfirmed: Counter<u64>,
    /// Withdrawn messages delivery found in the queue and dropped.
    pub withdrawn_dropped: Counter<u64>,
}

pub static METRICS: LazyLock<QueueMetrics> = LazyLock::new(|| {
    let m = opentelemetry::global::meter("correu");
    QueueMetrics {
        publish_duration: histogram(
            "correu.queue.publish.duration",
            "s",
            "Time from publish to a durable confirm",
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        ),
        errors: counter(
            "correu.queue.errors",
            "{error}",
            "Queue operations that failed (AMQP or spool), by operation",
        ),
        depth: m
            .u64_gauge("correu.queue.depth")
            .with_unit("{message}")
            .with_description("Messages waiting per queue, from the broker")
            .build(),
        unconfirmed: counter(
            "correu.queue.unconfirmed",
            "{message}",
            "New messages the broker never confirmed, by what became of them",
        ),
        withdrawn_dropped: counter(
            "correu.queue.withdrawn.dropped",
            "{message}",
            "Withdrawn messages found in the queue and dropped undelivered",
        ),
    }
});

/// Records each queue's depth.
pub fn record_depths(counts: &[QueueCount]) {
    for c in counts {
        METRICS
            .depth
            .record(c.messages, &[KeyValue::new("queue", c.name.clone())]);
    }
}

/// Makes the queue's instruments now (counters at zero), not at first use.
pub fn init() {
    LazyLock::force(&METRICS);
}
