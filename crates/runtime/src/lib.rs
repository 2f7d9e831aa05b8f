//! The service kit every Correu service shares: configuration, logging,
//! lifecycle and backoff.
//!
//! # Layout
//! - [`config`]: the TOML file, `CORREU_…` overrides, validation.
//! - [`telemetry`]: logging set-up from `CORREU_LOG`/`RUST_LOG`.
//! - [`metrics`]: instruments present from the start; process metrics.
//! - [`lifecycle`]: the shutdown token cancelled on SIGTERM or Ctrl-C.
//! - [`backoff`]: the one exponential backoff used for reconnecting.
//! - [`redis`]: the Redis pool, every timeout set.
//! - [`limits`]: rates and leases shared through Redis, with a local fallback.
//! - [`tls`]: how a TLS connection describes itself.
//! - [`sync`]: locks that outlive a panic, durable directories.
//! - [`cli`]: the start of every binary: config, logging, runtime, signals.
#![forbid(unsafe_code)]

pub mod backoff;

/// The allocator every Correu binary uses (`#[global_allocator]` in each
/// `main.rs`): jemalloc, with a background thread that hands freed memory
/// back to the system within about a second (`.cargo/config.toml` sets
/// `background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0`). With
/// glibc's malloc, memory freed after a storm of 2,000 connections stayed
/// in its arenas (RSS 43–57 MiB, never back to 14); with this it returns
/// to the idle size. Why not mimalloc: it kept more (docs/decisions.md).
pub use tikv_jemallocator::Jemalloc as Allocator;
pub mod cli;
pub mod config;
pub mod dns;
pub mod health;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod redis;
pub mod sync;
pub mod telemetry;
pub mod tls;

pub use config::Config;
