//! The service kit every Correu service shares: configuration, logging,
//! lifecycle and backoff.
//!
//! # Layout
//! - [`config`]: the TOML file, `CORREU_…` overrides, validation.
//! - [`telemetry`]: logging set-up from `CORREU_LOG`/`RUST_LOG`.
//! - [`lifecycle`]: the shutdown token cancelled on SIGTERM or Ctrl-C.
//! - [`backoff`]: the one exponential backoff used for reconnecting.
//! - [`redis`]: the Redis pool, every timeout set.
//! - [`limits`]: rates and leases shared through Redis, with a local fallback.
//! - [`tls`]: how a TLS connection describes itself.
//! - [`sync`]: locks that outlive a panic, durable directories.
//! - [`cli`]: the start of every binary: config, logging, runtime, signals.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod config;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod redis;
pub mod sync;
pub mod telemetry;
pub mod tls;

pub use config::Config;
