//! Delivery metrics; labels are closed sets, never an address.

use std::sync::LazyLock;

use correu_runtime::metrics::{counter, histogram};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

pub struct DeliveryMetrics {
    /// Per recipient and attempt, by `outcome` (`delivered`, `deferred`,
    /// `failed`) and `destination` (`local`, `remote`).
    pub attempts: Counter<u64>,
    /// From the `250` at ingress to delivered, per recipient.
    pub time_to_deliver: Histogram<f64>,
    /// Messages put in a retry tier.
    pub retries: Counter<u64>,
    /// Delivery status notifications queued, by `action`.
    pub reports: Counter<u64>,
    /// Messages parked for an operator, by `reason` (`undecodable`,
    /// `no_recipients`, `empty`, `panics`).
    pub parked: Counter<u64>,
    /// Recipients put on the suppression list, by bounce `class`.
    pub suppressed: Counter<u64>,
    /// Delivery events the queue could not take (logged; the message is
    /// settled anyway).
    pub events_lost: Counter<u64>,
    /// Per remote recipient and attempt, by `outcome` and `destination`:
    /// the shaping rule, a domain in `telemetry.domains`, or `other`.
    pub destination_attempts: Counter<u64>,
}

pub static METRICS: LazyLock<DeliveryMetrics> = LazyLock::new(|| DeliveryMetrics {
    attempts: counter(
        "correu.delivery.attempts",
        "{recipient}",
        "Delivery attempts per recipient, by outcome and destination",
    ),
    time_to_deliver: histogram(
        "correu.delivery.time_to_deliver",
        "s",
        "Time from acceptance to delivery, per recipient",
        &[
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            14400.0, 86400.0,
        ],
    ),
    retries: counter(
        "correu.delivery.retries",
        "{message}",
        "Messages scheduled for another attempt",
    ),
    reports: counter(
        "correu.delivery.reports",
        "{message}",
        "Delivery status notifications (bounces, delay warnings, success reports) queued",
    ),
    parked: counter(
        "correu.delivery.parked",
        "{message}",
        "Messages parked for an operator, by reason",
    ),
    suppressed: counter(
        "correu.delivery.suppressed",
        "{recipient}",
        "Recipients put on the suppression list, by bounce class",
    ),
    events_lost: counter(
        "correu.delivery.events_lost",
        "{event}",
        "Delivery events the queue could not take",
    ),
    destination_attempts: counter(
        "correu.delivery.destination.attempts",
        "{recipient}",
        "Remote delivery attempts per recipient, by destination (shaping rule, configured domain or other) and outcome",
    ),
});

/// Makes the instruments now (counters at zero), not at first use.
pub fn init() {
    LazyLock::force(&METRICS);
    // The series alerts divide by are there from the start.
    for outcome in ["delivered", "deferred", "failed"] {
        for destination in ["local", "remote"] {
            METRICS.attempts.add(
                0,
                &[
                    KeyValue::new("outcome", outcome),
                    KeyValue::new("destination", destination),
                ],
            );
        }
    }
    for action in ["failed", "delayed", "delivered", "relayed"] {
        METRICS.reports.add(0, &[KeyValue::new("action", action)]);
    }
    correu_queue::metrics::init();
}
