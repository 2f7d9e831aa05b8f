//! What the other services need of storage, without storage itself: the
//! gRPC client (over HTTP/2, or to a storage in the same process), and the
//! accounts and aliases files (Dovecot's passwd-file), which ingress also
//! reads for `smtp.auth_file`.
//!
//! # Layout
//! - [`client`]: [`Client`], its [`Transport`], trace context in metadata,
//!   the readiness check.
//! - [`accounts`]: parsing the files, argon2 passwords, [`accounts::Watched`]
//!   (a file reread when it changes, off the async threads).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod client;

pub use client::{
    Client, LocalService, Transport, connect, local, ready_check, trace_headers, traced,
};
