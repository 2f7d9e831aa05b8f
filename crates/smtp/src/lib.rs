//! The SMTP protocol for Correu, with no IO.
//!
//! Bytes go in; commands, replies and decisions come out. The ingress driver
//! (`correu-ingress`) and the delivery client (`correu-delivery`) do the
//! reading and writing, so everything here is tested with tables and
//! transcripts.
//!
//! # Layout
//! - [`address`]: mailbox syntax (RFC 5321 §4.1.2, RFC 6531).
//! - [`command`]: command lines to [`command::Command`] (RFC 5321 §4.1.1).
//! - [`reply`]: replies with enhanced status codes, writing and parsing.
//! - [`session`]: the server's state machine and the command line reader.
//! - [`data`]: the DATA receiver (dot-unstuffing, the final dot) and
//!   dot-stuffing for sending.
//! - [`headers`]: trace headers and dates (RFC 5322 §3.3).
//! - [`proxy`]: the PROXY protocol v1/v2 header load balancers send first.
#![forbid(unsafe_code)]

pub mod address;
pub mod command;
pub mod data;
pub mod headers;
pub mod proxy;
pub mod reply;
pub mod session;
pub mod srs;

pub use address::Address;
pub use reply::{Enhanced, Reply};
