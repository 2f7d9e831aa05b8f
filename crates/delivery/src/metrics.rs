//! Delivery metrics; labels are closed sets, never an address.

use std::sync::LazyLock;

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
}

pub static METRICS: LazyLock<DeliveryMetrics> = LazyLock::new(|| {
    let m = opentelemetry::global::meter("correu");
    DeliveryMetrics {
        attempts: m
            .u64_counter("correu.delivery.attempts")
            .with_unit("{recipient}")
            .with_description("Delivery attempts per recipient, by outcome and destination")
            .build(),
        time_to_deliver: m
            .f64_histogram("correu.delivery.time_to_deliver")
            .with_unit("s")
            .with_description("Time from acceptance to delivery, per recipient")
            .with_boundaries(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                14400.0, 86400.0,
            ])
            .build(),
        retries: m
            .u64_counter("correu.delivery.retries")
            .with_unit("{message}")
            .with_description("Messages scheduled for another attempt")
            .build(),
        reports: m
            .u64_counter("correu.delivery.reports")
            .with_unit("{message}")
            .with_description(
                "Delivery status notifications (bounces, delay warnings, success reports) queued",
            )
            .build(),
        parked: m
            .u64_counter("correu.delivery.parked")
            .with_unit("{message}")
            .with_description("Messages parked for an operator, by reason")
            .build(),
        suppressed: m
            .u64_counter("correu.delivery.suppressed")
            .with_unit("{recipient}")
            .with_description("Recipients put on the suppression list, by bounce class")
            .build(),
        events_lost: m
            .u64_counter("correu.delivery.events_lost")
            .with_unit("{event}")
            .with_description("Delivery events the queue could not take")
            .build(),
    }
});
