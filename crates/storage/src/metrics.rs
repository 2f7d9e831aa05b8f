//! Storage metrics: what `Deliver` did (by outcome), how long it took, the
//! copies and bytes written, quota refusals, and the mailboxes known.
//! Labels are closed sets, never an address.

use std::sync::{Arc, LazyLock, OnceLock};

use correu_runtime::metrics::{counter, histogram};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};

use crate::maildir::Mailboxes;

pub struct StorageMetrics {
    /// `Deliver` calls by `outcome`: `stored`, `duplicate` (every copy
    /// was already there), `quota`, `no_mailbox`, `invalid`, `error`.
    pub deliveries: Counter<u64>,
    /// Time of a `Deliver` call, by `outcome`.
    pub duration: Histogram<f64>,
    /// Mailbox files written (a message to an alias with three targets
    /// is three copies).
    pub copies: Counter<u64>,
    /// Deliveries refused because a mailbox was over its quota.
    pub quota_refusals: Counter<u64>,
    /// Message bytes written to mailboxes.
    pub written: Counter<u64>,
}

pub static METRICS: LazyLock<StorageMetrics> = LazyLock::new(|| StorageMetrics {
    deliveries: counter(
        "correu.storage.deliveries",
        "{call}",
        "Deliver calls, by outcome",
    ),
    duration: histogram(
        "correu.storage.deliver.duration",
        "s",
        "Time of a Deliver call (the files made durable), by outcome",
        &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ],
    ),
    copies: counter("correu.storage.copies", "{file}", "Mailbox files written"),
    quota_refusals: counter(
        "correu.storage.quota_refusals",
        "{call}",
        "Deliveries refused because a mailbox was full",
    ),
    written: counter(
        "correu.storage.written",
        "By",
        "Message bytes written to mailboxes",
    ),
});

impl StorageMetrics {
    /// One `Deliver` call's outcome and time.
    pub fn delivered(&self, outcome: &'static str, secs: f64) {
        let label = [KeyValue::new("outcome", outcome)];
        self.deliveries.add(1, &label);
        self.duration.record(secs, &label);
        if outcome == "quota" {
            self.quota_refusals.add(1, &[]);
        }
    }
}

/// Makes the instruments (every counter at zero) and the mailbox gauge
/// over `boxes`: once per process.
pub fn init(boxes: &Arc<Mailboxes>) {
    static GAUGE: OnceLock<ObservableGauge<u64>> = OnceLock::new();
    LazyLock::force(&METRICS);
    let boxes = Arc::downgrade(boxes);
    GAUGE.get_or_init(|| {
        opentelemetry::global::meter("correu")
            .u64_observable_gauge("correu.storage.mailboxes")
            .with_unit("{mailbox}")
            .with_description(
                "Mailboxes storage knows (accounts and listed addresses; on disk in open mode)",
            )
            .with_callback(move |o| {
                if let Some(b) = boxes.upgrade() {
                    o.observe(b.mailbox_count() as u64, &[]);
                }
            })
            .build()
    });
}
