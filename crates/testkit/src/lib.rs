//! Helpers for Correu's tests, by topic; everything is re-exported here.
//! Used only as a dev-dependency.
//!
//! # Layout
//! - [`process`]: child processes and commands.
//! - [`ports`]: free ports, closed ports, connections, HTTP GET.
//! - [`smtp`]: a raw SMTP client, load, swaks.
//! - [`maildir`]: waiting for mail, exactly-once checks.
//! - [`rabbitmq`]: vhosts and private nodes.
//! - [`peers`]: aiosmtpd, an MTA-STS server, dnsmasq, Postfix, Dovecot.
//! - [`dnssec`]: a DNSSEC-signed DNS (BIND) with its trust anchor.
//! - [`pki`]: test certificates.
//! - [`otlp`]: an OTLP trace receiver.
//! - [`faults`]: a TCP proxy that cuts or stalls.
// Test helpers: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use correu_smtp::reply::{Reply, parse_reply};

pub mod dnssec;
pub mod faults;
pub mod maildir;
pub mod otlp;
pub mod peers;
pub mod pki;
pub mod ports;
pub mod process;
pub mod rabbitmq;
pub mod redis;
pub mod smtp;

pub use dnssec::*;
pub use faults::*;
pub use maildir::*;
pub use otlp::*;
pub use peers::*;
pub use pki::*;
pub use ports::*;
pub use process::*;
pub use rabbitmq::*;
pub use redis::*;
pub use smtp::*;
