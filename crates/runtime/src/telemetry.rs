//! Logging, set up once per process.
//!
//! The level comes from `CORREU_LOG`, else `RUST_LOG`, else `info`. Logs go
//! to standard error, human-readable on a terminal and as JSON lines
//! elsewhere (or as `CORREU_LOG_FORMAT=json|text` says), so a terminal user
//! and a log collector both get what they read best.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Calling it twice is harmless.
pub fn init(service: &'static str) {
    let filter = std::env::var("CORREU_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("CORREU_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "logging started");
    }
}
