//! `[events]`: delivery outcomes as a stream, and `[webhook]`: the
//! consumer that posts them to a sender's own systems.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::Dur;

/// `[events]`: publish every delivery outcome (delivered, deferred,
/// bounced, expired, suppressed) as a `correu.v1.DeliveryEvent`: to the
/// topic exchange `<queue.prefix>.events` on RabbitMQ, or to
/// `<queue.spool>/events` for `correu serve`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Off by default: nothing is published, and nothing waits for it.
    pub enabled: bool,
}

/// `[webhook]`: `correu webhook` (and `correu serve` when `urls` is set)
/// posts each event as JSON to every URL, signed with HMAC-SHA256.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URLs; each gets every event.
    pub urls: Vec<String>,
    /// A file holding the signing secret (its first line). Unset: posts
    /// are not signed.
    pub secret_file: Option<PathBuf>,
    /// Deadline of one POST, connection included.
    pub timeout: Dur,
    /// Outcomes to post (`delivered`, `deferred`, `bounced`, `expired`,
    /// `suppressed`); empty for all.
    pub outcomes: Vec<String>,
    /// Events posted at once by one process.
    pub concurrency: usize,
    /// More CA certificates (PEM) trusted for `https://` URLs.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            urls: Vec::new(),
            secret_file: None,
            timeout: Dur::secs(10),
            outcomes: Vec::new(),
            concurrency: 8,
            tls_ca_file: None,
        }
    }
}

/// The outcomes an event can have, as webhook JSON and routing keys name them.
pub const OUTCOMES: [&str; 5] = ["delivered", "deferred", "bounced", "expired", "suppressed"];

impl WebhookConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        if !c.role.runs_webhook() {
            return;
        }
        if c.role == super::Role::Webhook && self.urls.is_empty() {
            c.err(
                "webhook.urls",
                "at least one URL is needed to run the webhook service",
            );
        }
        for (i, u) in self.urls.iter().enumerate() {
            let ok = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"))
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
            if !ok {
                c.err(
                    format!("webhook.urls[{i}]"),
                    format!("`{u}` is not an http:// or https:// URL"),
                );
            }
        }
        for (i, o) in self.outcomes.iter().enumerate() {
            if !OUTCOMES.contains(&o.as_str()) {
                c.err(
                    format!("webhook.outcomes[{i}]"),
                    format!("`{o}` is not one of {}", OUTCOMES.join(", ")),
                );
            }
        }
        if self.concurrency == 0 {
            c.err("webhook.concurrency", "must be more than 0");
        }
        if self.timeout.get().is_zero() {
            c.err("webhook.timeout", "must be more than 0");
        }
        if let Some(f) = &self.secret_file {
            c.readable_file("webhook.secret_file", f);
        }
        if let Some(f) = &self.tls_ca_file {
            c.readable_file("webhook.tls_ca_file", f);
        }
    }
}
