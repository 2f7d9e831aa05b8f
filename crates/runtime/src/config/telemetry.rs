//! `[telemetry]`: the health and metrics port, and what spans may say.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Health, metrics and what spans may say. Exporting traces and metrics
/// is set by OpenTelemetry's own `OTEL_…` environment variables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// The HTTP port with `/livez`, `/readyz` and `/metrics`. Unset, each
    /// role has its own, so the three services run on one host from one
    /// file: 127.0.0.1:9725 for `serve` and ingress, :9726 for delivery,
    /// :9727 for storage.
    pub listen: SocketAddr,
    /// Put envelope addresses (sender, recipients) in spans. Off: spans
    /// carry queue ids, sizes and counts, never an address.
    pub span_addresses: bool,
    /// Destination domains that get their own `destination` label on
    /// `correu.delivery.destination.attempts` (a shaping rule's name
    /// labels the domains and hosts it covers; every other is `other`):
    /// the label's values stay a set the operator chose.
    pub domains: Vec<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9725)),
            span_addresses: false,
            domains: Vec::new(),
        }
    }
}
