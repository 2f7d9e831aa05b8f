//! Webhook metrics; labels are closed sets, never a URL or an address.

use std::sync::LazyLock;

use correu_runtime::metrics::{counter, histogram};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

pub struct WebhookMetrics {
    /// POSTs by `event` (the outcome) and `result` (`posted`, `failed`,
    /// `refused`: a 4xx that will not change).
    pub posts: Counter<u64>,
    /// How long a POST took, by `result`.
    pub duration: Histogram<f64>,
    /// Payloads on the event queue that were not events.
    pub dropped: Counter<u64>,
}

impl WebhookMetrics {
    pub fn record(&self, event: &'static str, result: &'static str, secs: f64) {
        self.posts.add(
            1,
            &[
                KeyValue::new("event", event),
                KeyValue::new("result", result),
            ],
        );
        self.duration
            .record(secs, &[KeyValue::new("result", result)]);
    }
}

pub static METRICS: LazyLock<WebhookMetrics> = LazyLock::new(|| WebhookMetrics {
    posts: counter(
        "correu.webhook.posts",
        "{request}",
        "Webhook POSTs, by event and result",
    ),
    duration: histogram(
        "correu.webhook.duration",
        "s",
        "Time to POST one event, by result",
        &[0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
    ),
    dropped: counter(
        "correu.webhook.dropped",
        "{event}",
        "Payloads on the event queue that were not events",
    ),
});

/// Makes the instruments now (counters at zero), not at first use.
pub fn init() {
    LazyLock::force(&METRICS);
    correu_queue::metrics::init();
}
