//! Correu's configuration: one TOML file, `CORREU_…` environment overrides,
//! checked in full before any port is bound.
//!
//! Every key has a default, so an empty file (or none) runs `correu serve`
//! on 127.0.0.1:2525 for the domain `localhost`. Errors name the key:
//! `smtp.listen[0]: invalid socket address syntax`.
//!
//! Environment overrides name a key with its section: `CORREU_HOSTNAME`,
//! `CORREU_SMTP_LISTEN`, `CORREU_QUEUE_URL`, `CORREU_DELIVERY_MX_PORT`. The
//! value is read as a TOML value when it is one (`25`, `true`,
//! `["a","b"]`), else as a string; lists also take `a,b`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The sections a `CORREU_<SECTION>_<KEY>` variable may name.
const SECTIONS: [&str; 6] = ["smtp", "queue", "storage", "delivery", "redis", "telemetry"];
/// Variables that are not configuration keys.
const NOT_KEYS: [&str; 3] = ["CORREU_LOG", "CORREU_LOG_FORMAT", "CORREU_CONFIG"];

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// This server's name: greeting, EHLO, Received, and HELO when relaying.
    pub hostname: String,
    /// Domains whose mail is stored here; every other domain is relayed.
    #[serde(deserialize_with = "one_or_many")]
    pub domains: Vec<String>,
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub storage: StorageConfig,
    pub delivery: DeliveryConfig,
    pub redis: RedisConfig,
    pub telemetry: TelemetryConfig,
}

/// Health, metrics and what spans may say. Exporting traces and metrics
/// is set by OpenTelemetry's own `OTEL_…` environment variables.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// The HTTP port with `/livez`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// Put envelope addresses (sender, recipients) in spans. Off: spans
    /// carry queue ids, sizes and counts, never an address.
    pub span_addresses: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9725)),
            span_addresses: false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".into(),
            domains: vec!["localhost".into()],
            smtp: SmtpConfig::default(),
            queue: QueueConfig::default(),
            storage: StorageConfig::default(),
            delivery: DeliveryConfig::default(),
            redis: RedisConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

/// Redis, shared by replicas for rate limits; optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://host:port/db`; unset: limits are kept in each process.
    pub url: Option<String>,
    /// Prefix of every key Correu writes.
    pub prefix: String,
    /// Deadline of every Redis call (and of getting a connection).
    pub timeout: Dur,
    /// Connections per process.
    pub pool_size: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            prefix: "correu".into(),
            timeout: Dur(Duration::from_millis(250)),
            pool_size: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SmtpConfig {
    /// Addresses the SMTP listener binds.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Clients in these networks may relay to any domain (Postfix's
    /// `mynetworks`). Everyone else may only send to local domains.
    #[serde(deserialize_with = "one_or_many")]
    pub trusted_networks: Vec<Network>,
    /// Largest message accepted, in octets (advertised with SIZE).
    pub max_message_size: u64,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Error replies before the session is closed with `421`.
    pub max_errors: usize,
    /// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4: 512).
    pub max_line_length: usize,
    /// Open SMTP connections at most; more get `421 4.3.2`.
    pub max_connections: usize,
    /// Time to wait for a command (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command_timeout: Dur,
    /// Time to wait for each chunk of DATA (RFC 5321 §4.5.3.2.5: 3 minutes).
    pub data_timeout: Dur,
    /// Time for storage to say whether a local recipient exists.
    pub recipient_check_timeout: Dur,
    /// How long a local recipient storage said exists is taken as existing
    /// without asking again (0: ask at every RCPT).
    pub recipient_cache: Dur,
    /// Time sessions in progress get to finish when the server stops.
    pub shutdown_grace: Dur,
    /// Submission listeners (port 587, RFC 6409): STARTTLS, then AUTH,
    /// before MAIL; authenticated users may relay.
    #[serde(deserialize_with = "one_or_many")]
    pub submission: Vec<SocketAddr>,
    /// Implicit-TLS submission listeners (port 465, RFC 8314).
    #[serde(deserialize_with = "one_or_many")]
    pub submissions: Vec<SocketAddr>,
    /// Certificate chain (PEM) for STARTTLS and implicit TLS; reloaded
    /// when the file changes.
    pub tls_certificate: Option<PathBuf>,
    /// Private key (PEM) of the certificate.
    pub tls_key: Option<PathBuf>,
    /// Time for a TLS handshake.
    pub tls_handshake_timeout: Dur,
    /// Accounts for AUTH: lines `address:ARGON2-HASH` (Dovecot passwd-file
    /// style; `correu hash-password` makes the hash); reloaded on change.
    /// Unset: storage's accounts (`storage.accounts_file`) are asked.
    pub auth_file: Option<PathBuf>,
    /// Load balancers that speak the PROXY protocol (v1 or v2): a
    /// connection from one of these must start with a PROXY header, and the
    /// address in it is the client's.
    #[serde(deserialize_with = "one_or_many")]
    pub proxy_networks: Vec<Network>,
    /// Time to wait for the PROXY header.
    pub proxy_timeout: Dur,
    /// Messages in one session before it is closed with `421 4.7.0`.
    pub max_transactions: usize,
    /// Longest text line in a message, CRLF included (RFC 5321
    /// §4.5.3.1.6); 0 for no limit.
    pub max_text_line: usize,
    /// Refuse messages with a bare CR or LF (`550 5.5.2`) instead of storing
    /// them as CRLF.
    pub reject_bare_line_ends: bool,
    /// Most `Received:` fields a message may arrive with; one with more is
    /// in a mail loop and refused with `554 5.4.6` (RFC 5321 §6.3).
    pub max_hops: usize,
    /// Open connections from one client address (trusted networks exempt).
    pub max_connections_per_client: usize,
    /// Longest a session may last.
    pub max_session_time: Dur,
    /// New connections per client address (`N/DURATION`, `0` for no limit;
    /// trusted networks exempt), shared across replicas through Redis.
    pub connection_rate: Rate,
    /// Messages per client address, likewise.
    pub message_rate: Rate,
    /// Messages per authenticated user.
    pub user_message_rate: Rate,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            trusted_networks: vec![Network::LOOPBACK_V4, Network::LOOPBACK_V6],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 20,
            max_line_length: 512,
            max_connections: 1000,
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(180),
            recipient_check_timeout: Dur::secs(5),
            recipient_cache: Dur::secs(10),
            shutdown_grace: Dur::secs(25),
            submission: Vec::new(),
            submissions: Vec::new(),
            tls_certificate: None,
            tls_key: None,
            tls_handshake_timeout: Dur::secs(30),
            auth_file: None,
            proxy_networks: Vec::new(),
            proxy_timeout: Dur::secs(10),
            max_transactions: 100,
            max_text_line: 1000,
            reject_bare_line_ends: false,
            max_hops: 100,
            max_connections_per_client: 50,
            max_session_time: Dur::secs(30 * 60),
            connection_rate: Rate::per(120, 60),
            message_rate: Rate::per(600, 60),
            user_message_rate: Rate::per(1000, 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// RabbitMQ, for the services on their own (Kubernetes).
    Rabbitmq,
    /// A spool directory in the process, for `correu serve`.
    Embedded,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QueueConfig {
    /// Default: `embedded` for `correu serve`, `rabbitmq` for the services.
    pub backend: Option<QueueBackend>,
    /// RabbitMQ's AMQP URL (vhost included).
    pub url: String,
    /// Prefix of every exchange and queue Correu declares.
    pub prefix: String,
    /// The embedded backend's spool directory.
    pub spool: PathBuf,
    /// Time for the broker to confirm a publish before the client gets `451`.
    pub publish_timeout: Dur,
    /// Time to connect to the broker.
    pub connect_timeout: Dur,
    /// Unacknowledged messages per delivery consumer.
    pub prefetch: u16,
    /// Delay before each retry, one retry tier each; the last repeats.
    #[serde(deserialize_with = "one_or_many")]
    pub retry_delays: Vec<Dur>,
    /// Age after which a message that still fails is given up.
    pub max_age: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: None,
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "correu".into(),
            spool: PathBuf::from("data/queue"),
            publish_timeout: Dur::secs(10),
            connect_timeout: Dur::secs(5),
            prefetch: 32,
            // Postfix-like: minutes first, then hours.
            retry_delays: [60, 300, 900, 1800, 3600, 7200, 14400]
                .into_iter()
                .map(Dur::secs)
                .collect(),
            max_age: Dur::secs(5 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// Where the storage service's gRPC server listens.
    pub listen: SocketAddr,
    /// How ingress and delivery reach storage (the storage Service in Kubernetes).
    pub endpoint: String,
    /// The directory holding one Maildir per mailbox: `ROOT/DOMAIN/USER/`.
    pub root: PathBuf,
    /// Addresses that have a mailbox. Empty: every local-part of a local
    /// domain is accepted (catch-all).
    #[serde(deserialize_with = "one_or_many")]
    pub mailboxes: Vec<String>,
    /// Accounts in Dovecot's passwd-file format (`address:argon2-hash`,
    /// quota in the extra fields), reread when it changes.
    pub accounts_file: Option<PathBuf>,
    /// Aliases: `address: target, target`; `@domain: target` for a catch-all.
    pub aliases_file: Option<PathBuf>,
    /// Quota of a mailbox whose account sets none (`0`: none).
    pub default_quota: Size,
    /// Deadline of each gRPC call to storage.
    pub request_timeout: Dur,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2526)),
            endpoint: "http://127.0.0.1:2526".into(),
            root: PathBuf::from("data/mail"),
            mailboxes: Vec::new(),
            accounts_file: None,
            aliases_file: None,
            default_quota: Size(0),
            request_timeout: Dur::secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DeliveryConfig {
    /// Messages delivered at once by one delivery process.
    pub concurrency: usize,
    /// The DNS server for MX lookups (`host:port`); unset: the system's.
    pub dns_server: Option<SocketAddr>,
    /// Port of remote MX hosts (25; another only for tests and labs).
    pub mx_port: u16,
    /// Fixed next hops by domain (`"*"` for all) instead of MX: `host:port`,
    /// or a table with `host`, `port`, `tls`, `auth_user`,
    /// `auth_password_file` (a smarthost).
    pub routes: BTreeMap<String, Route>,
    /// TLS to other servers: `opportunistic` (STARTTLS whenever offered,
    /// certificate not checked), `required` (verified, else the message
    /// waits) or `none`.
    pub tls: OutboundTls,
    /// More CA certificates (PEM) trusted for `required` TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Honour MTA-STS (RFC 8461): a domain that publishes an `enforce`
    /// policy gets mail only at the MX hosts it names, over verified TLS.
    pub mta_sts: bool,
    /// HTTPS port of `mta-sts.DOMAIN` (443; another only for tests).
    pub mta_sts_port: u16,
    /// Bounce messages (RFC 3464) for recipients that fail for good.
    pub bounces: bool,
    /// Connections open at once to one destination host, shared by every
    /// delivery process through Redis. A host at its limit is passed over;
    /// when all are, the message waits in the retry tiers.
    pub max_connections_per_host: usize,
    /// Messages per destination domain (`N/DURATION`, `0` for no limit),
    /// shared likewise.
    pub domain_rate: Rate,
    /// Warn the sender (a DSN with Action: delayed) once when a message is
    /// still undelivered after this long; `0s` for never (Postfix's
    /// `delay_warning_time`).
    pub delay_warning: Dur,
    /// How long a connection to a remote host is kept for the next message
    /// to it (0 to close after each message).
    pub connection_idle: Dur,
    /// DKIM keys by signing domain: outbound mail whose From: is in the
    /// domain is signed (RFC 6376).
    pub dkim: BTreeMap<String, DkimConfig>,
    /// Time to connect to a remote MX (RFC 5321 suggests at most minutes).
    pub connect_timeout: Dur,
    /// Time for each reply of the remote MX (RFC 5321 §4.5.3.2: 5 minutes).
    pub command_timeout: Dur,
    /// Time for the reply after the final dot (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_timeout: Dur,
    /// Longest one delivery attempt of a message may take; recipients not
    /// done by then are retried. Keep it under RabbitMQ's
    /// `consumer_timeout` (30 minutes by default), which closes consumers
    /// that hold a message longer.
    pub attempt_timeout: Dur,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 16,
            dns_server: None,
            mx_port: 25,
            routes: BTreeMap::new(),
            tls: OutboundTls::Opportunistic,
            tls_ca_file: None,
            mta_sts: true,
            mta_sts_port: 443,
            bounces: true,
            max_connections_per_host: 10,
            domain_rate: Rate::per(0, 1),
            dkim: BTreeMap::new(),
            connection_idle: Dur::secs(10),
            delay_warning: Dur::secs(0),
            connect_timeout: Dur::secs(30),
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(600),
            attempt_timeout: Dur::secs(15 * 60),
        }
    }
}

/// A DKIM signing key (`correu dkim keygen` makes one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub selector: String,
    /// The private key, PEM: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    pub key_file: PathBuf,
    #[serde(default = "DkimAlgorithm::default_rsa")]
    pub algorithm: DkimAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl DkimAlgorithm {
    fn default_rsa() -> Self {
        DkimAlgorithm::RsaSha256
    }
}

/// How a next hop is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    None,
    Opportunistic,
    Required,
}

/// A fixed next hop for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub port: u16,
    /// Overrides `delivery.tls` for this hop.
    pub tls: Option<OutboundTls>,
    /// AUTH PLAIN with the relay (after TLS).
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            host: String,
            #[serde(default = "smtp_port")]
            port: u16,
            tls: Option<OutboundTls>,
            auth_user: Option<String>,
            auth_password_file: Option<PathBuf>,
        }
        fn smtp_port() -> u16 {
            25
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Table(Table),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => {
                let (host, port) = split_host_port(&t)
                    .ok_or_else(|| serde::de::Error::custom(format!("`{t}` is not host:port")))?;
                Ok(Route {
                    host,
                    port,
                    tls: None,
                    auth_user: None,
                    auth_password_file: None,
                })
            }
            Raw::Table(t) => Ok(Route {
                host: t.host,
                port: t.port,
                tls: t.tls,
                auth_user: t.auth_user,
                auth_password_file: t.auth_password_file,
            }),
        }
    }
}

/// A rate `N/DURATION` (`120/1m`), or `0` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    pub const fn per(count: u64, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.count == 0
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s.eq_ignore_ascii_case("unlimited") {
            return Ok(Rate::per(0, 1));
        }
        let bad = || format!("`{s}` is not a rate like 120/1m (or 0 for no limit)");
        let (n, d) = s.split_once('/').ok_or_else(bad)?;
        let count = n.trim().parse().map_err(|_| bad())?;
        let per: Dur = d.parse().map_err(|_| bad())?;
        if per.get().is_zero() {
            return Err(bad());
        }
        Ok(Rate {
            count,
            per: per.get(),
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Zero(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Zero(0) => Ok(Rate::per(0, 1)),
            Raw::Zero(n) => Err(serde::de::Error::custom(format!(
                "`{n}`: write a rate like {n}/1m"
            ))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written `250ms`, `30s`, `5m`, `2h`, `5d` or as whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like 30s, 5m or 250ms"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(format!("`{s}`: unit must be ms, s, m, h or d")),
        };
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Dur::secs(s)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A size in bytes, written as a number or `512k`, `100M`, `1G`, `2T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size like 1024, 512k, 100M or 1G"))?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1 << 10,
            "m" | "mb" => 1 << 20,
            "g" | "gb" => 1 << 30,
            "t" | "tb" => 1 << 40,
            _ => return Err(format!("`{s}`: unit must be k, M, G or T")),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Size(b)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub const LOOPBACK_V4: Network = Network {
        addr: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)),
        prefix: 8,
    };
    pub const LOOPBACK_V6: Network = Network {
        addr: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        prefix: 128,
    };

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen on an IPv6 socket (::ffff:a.b.c.d) is IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A list, or one string holding comma-separated items (for environment
/// variables: `CORREU_DOMAINS=a.org,b.org`).
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + FromStr,
    T::Err: fmt::Display,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T> serde::de::Visitor<'de> for V<T>
    where
        T: Deserialize<'de> + FromStr,
        T::Err: fmt::Display,
    {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list, or a string of comma-separated items")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<T>, E> {
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().map_err(|e| E::custom(format!("`{p}`: {e}"))))
                .collect()
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// One thing wrong with the configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, as a TOML path (`smtp.listen[0]`), or the file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "configuration has {} error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Loads the file (if any), applies `CORREU_…` variables from `env`, and
    /// checks the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigErrors(vec![err(
                        path.display().to_string(),
                        format!("cannot read: {e}"),
                    )])
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigErrors(vec![err(
                        path.display().to_string(),
                        format!("not valid TOML: {}", e.to_string().trim()),
                    )])
                })?
            }
            None => toml::Table::new(),
        };
        let mut errors = Vec::new();
        let mut sources = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CORREU_") else {
                continue;
            };
            if NOT_KEYS.contains(&name.as_str()) {
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let path: Vec<String> = match SECTIONS
                .iter()
                .find(|s| key.strip_prefix(*s).is_some_and(|r| r.starts_with('_')))
            {
                Some(section) => vec![section.to_string(), key[section.len() + 1..].to_string()],
                None => vec![key],
            };
            let value = parse_env_value(&value);
            let dotted = path.join(".");
            sources.insert(dotted.clone(), name.clone());
            if let Err(m) = set_path(&mut root, &path, value) {
                errors.push(err(format!("{dotted} (from {name})"), m));
            }
        }
        let config = Self::from_table(root, &sources).map_err(|mut e| {
            e.0.splice(0..0, errors.clone());
            e
        })?;
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(config)
    }

    fn from_table(
        table: toml::Table,
        sources: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigErrors> {
        let name = |path: String| match sources.get(&path) {
            Some(var) => format!("{path} (from {var})"),
            None => path,
        };
        let mut unknown = Vec::new();
        let value = toml::Value::Table(table);
        let mut track = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(value, &mut track);
        let parsed: Result<Config, _> = serde_path_to_error::deserialize(de);
        let mut errors: Vec<ConfigError> = unknown
            .into_iter()
            .map(|k| err(name(k), "unknown key"))
            .collect();
        match parsed {
            Ok(config) => {
                errors.extend(config.validate());
                if errors.is_empty() {
                    Ok(config)
                } else {
                    Err(ConfigErrors(errors))
                }
            }
            Err(e) => {
                let path = e.path().to_string();
                errors.push(err(name(path), e.into_inner().to_string()));
                Err(ConfigErrors(errors))
            }
        }
    }

    /// The checks serde cannot make: every one that fails is reported.
    fn validate(&self) -> Vec<ConfigError> {
        let mut e = Vec::new();
        if !is_domain(&self.hostname) {
            e.push(err(
                "hostname",
                format!("`{}` is not a host name", self.hostname),
            ));
        }
        if self.domains.is_empty() {
            e.push(err("domains", "at least one local domain is needed"));
        }
        for (i, d) in self.domains.iter().enumerate() {
            if !is_domain(d) {
                e.push(err(
                    format!("domains[{i}]"),
                    format!("`{d}` is not a domain"),
                ));
            }
        }
        let s = &self.smtp;
        if s.listen.is_empty() {
            e.push(err("smtp.listen", "at least one address is needed"));
        }
        if s.max_message_size == 0 {
            e.push(err("smtp.max_message_size", "must be more than 0"));
        }
        if s.max_recipients == 0 {
            e.push(err("smtp.max_recipients", "must be more than 0"));
        }
        if s.max_errors == 0 {
            e.push(err("smtp.max_errors", "must be more than 0"));
        }
        if s.max_line_length < 512 {
            e.push(err(
                "smtp.max_line_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)",
            ));
        }
        if s.max_connections == 0 {
            e.push(err("smtp.max_connections", "must be more than 0"));
        }
        if s.max_transactions == 0 {
            e.push(err("smtp.max_transactions", "must be more than 0"));
        }
        if s.max_connections_per_client == 0 {
            e.push(err(
                "smtp.max_connections_per_client",
                "must be more than 0",
            ));
        }
        if s.max_hops == 0 {
            e.push(err(
                "smtp.max_hops",
                "must be more than 0 (RFC 5321 §6.3 advises at least 100)",
            ));
        }
        if s.max_text_line != 0 && s.max_text_line < 1000 {
            e.push(err(
                "smtp.max_text_line",
                "must be 0 (no limit) or at least 1000 (RFC 5321 §4.5.3.1.6)",
            ));
        }
        match (&s.tls_certificate, &s.tls_key) {
            (Some(_), None) => e.push(err("smtp.tls_key", "needed with smtp.tls_certificate")),
            (None, Some(_)) => e.push(err("smtp.tls_certificate", "needed with smtp.tls_key")),
            _ => {}
        }
        for (key, addrs) in [
            ("smtp.submission", &s.submission),
            ("smtp.submissions", &s.submissions),
        ] {
            if !addrs.is_empty() && s.tls_certificate.is_none() {
                e.push(err(
                    key,
                    "submission needs TLS: set smtp.tls_certificate and smtp.tls_key",
                ));
            }
        }
        for (key, path) in [
            ("smtp.tls_certificate", &s.tls_certificate),
            ("smtp.tls_key", &s.tls_key),
            ("smtp.auth_file", &s.auth_file),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                e.push(err(key, format!("{} is not a readable file", p.display())));
            }
        }
        let q = &self.queue;
        if !(q.url.starts_with("amqp://") || q.url.starts_with("amqps://")) {
            e.push(err("queue.url", "must start with amqp:// or amqps://"));
        }
        if q.prefix.is_empty()
            || !q
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            e.push(err(
                "queue.prefix",
                "must be letters, digits, '-', '_' or '.'",
            ));
        }
        if q.prefetch == 0 {
            e.push(err("queue.prefetch", "must be more than 0"));
        }
        if q.retry_delays.is_empty() {
            e.push(err("queue.retry_delays", "at least one delay is needed"));
        }
        if q.publish_timeout.get().is_zero() {
            e.push(err("queue.publish_timeout", "must be more than 0"));
        }
        let st = &self.storage;
        if !(st.endpoint.starts_with("http://") || st.endpoint.starts_with("https://")) {
            e.push(err(
                "storage.endpoint",
                "must be a URL like http://storage:2526",
            ));
        }
        for (i, m) in st.mailboxes.iter().enumerate() {
            match m.rsplit_once('@') {
                Some((local, domain))
                    if !local.is_empty()
                        && self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) => {}
                _ => e.push(err(
                    format!("storage.mailboxes[{i}]"),
                    format!("`{m}` is not an address in one of `domains`"),
                )),
            }
        }
        if let Some(url) = &self.redis.url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
        {
            e.push(err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        if self.redis.pool_size == 0 {
            e.push(err("redis.pool_size", "must be more than 0"));
        }
        let d = &self.delivery;
        if d.concurrency == 0 {
            e.push(err("delivery.concurrency", "must be more than 0"));
        }
        if d.max_connections_per_host == 0 {
            e.push(err(
                "delivery.max_connections_per_host",
                "must be more than 0",
            ));
        }
        if d.attempt_timeout.get().is_zero() || d.attempt_timeout > Dur::secs(25 * 60) {
            e.push(err(
                "delivery.attempt_timeout",
                "must be more than 0 and at most 25m (RabbitMQ closes consumers that hold a message 30m)",
            ));
        }
        for (domain, route) in &d.routes {
            let key = format!("delivery.routes.{domain}");
            if domain != "*" && !is_domain(domain) {
                e.push(err(&key, "key must be a domain or \"*\""));
            }
            if route.host.is_empty() {
                e.push(err(format!("{key}.host"), "must not be empty"));
            }
            match (&route.auth_user, &route.auth_password_file) {
                (Some(_), None) => e.push(err(
                    format!("{key}.auth_password_file"),
                    "needed with auth_user",
                )),
                (None, Some(_)) => e.push(err(
                    format!("{key}.auth_user"),
                    "needed with auth_password_file",
                )),
                (Some(_), Some(p)) if !p.is_file() => e.push(err(
                    format!("{key}.auth_password_file"),
                    format!("{} is not a readable file", p.display()),
                )),
                _ => {}
            }
            if route.auth_user.is_some() && route.tls.unwrap_or(d.tls) == OutboundTls::None {
                e.push(err(
                    format!("{key}.tls"),
                    "AUTH needs TLS: passwords are never sent in the clear",
                ));
            }
        }
        for (domain, k) in &d.dkim {
            if !is_domain(domain) {
                e.push(err(
                    format!("delivery.dkim.{domain}"),
                    "key must be a domain",
                ));
            }
            if k.selector.is_empty()
                || !k
                    .selector
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            {
                e.push(err(
                    format!("delivery.dkim.{domain}.selector"),
                    "letters, digits, '-', '_' and '.' only",
                ));
            }
            if !k.key_file.is_file() {
                e.push(err(
                    format!("delivery.dkim.{domain}.key_file"),
                    format!("{} is not a readable file", k.key_file.display()),
                ));
            }
        }
        if let Some(p) = &d.tls_ca_file
            && !p.is_file()
        {
            e.push(err(
                "delivery.tls_ca_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
        e
    }

    /// The queue backend: as configured, or the default for the caller.
    pub fn queue_backend(&self, default: QueueBackend) -> QueueBackend {
        self.queue.backend.unwrap_or(default)
    }
}

/// Splits `host:port` (or `[v6]:port`).
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("correu.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn keys(e: ConfigErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.domains, vec!["localhost"]);
        assert_eq!(c.smtp.max_recipients, 100);
        assert_eq!(c.queue.max_age, Dur::secs(432_000));
        assert!(c.storage.mailboxes.is_empty());
        assert_eq!(
            c.queue_backend(QueueBackend::Embedded),
            QueueBackend::Embedded
        );
    }

    #[test]
    fn file_values_and_env_overrides() {
        let c = load(
            "hostname = \"mx.example.org\"\ndomains = [\"example.org\"]\n[smtp]\nmax_recipients = 5\ncommand_timeout = \"2m\"\n[delivery.routes]\n\"*\" = \"smarthost:587\"\n",
            &[
                ("CORREU_SMTP_LISTEN", "0.0.0.0:25,[::]:25"),
                ("CORREU_QUEUE_BACKEND", "rabbitmq"),
                ("CORREU_DELIVERY_MX_PORT", "2500"),
                ("CORREU_SMTP_MAX_MESSAGE_SIZE", "1000"),
                ("CORREU_LOG", "debug"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c.hostname, "mx.example.org");
        assert_eq!(c.smtp.max_recipients, 5);
        assert_eq!(c.smtp.command_timeout, Dur::secs(120));
        assert_eq!(c.smtp.listen.len(), 2);
        assert_eq!(c.smtp.max_message_size, 1000);
        assert_eq!(c.queue.backend, Some(QueueBackend::Rabbitmq));
        assert_eq!(c.delivery.mx_port, 2500);
        assert_eq!(c.delivery.routes["*"].host, "smarthost");
        assert_eq!(c.delivery.routes["*"].port, 587);
    }

    #[test]
    fn routes_as_strings_or_tables() {
        let c = load(
            "[delivery]\ntls = \"required\"\n[delivery.routes]\n\"a.org\" = \"mx.a.org:2525\"\n\"*\" = { host = \"relay.example\", port = 587, tls = \"opportunistic\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.delivery.tls, OutboundTls::Required);
        assert_eq!(c.delivery.routes["a.org"].port, 2525);
        assert_eq!(c.delivery.routes["*"].tls, Some(OutboundTls::Opportunistic));
        let e = load(
            "[delivery.routes]\n\"*\" = { host = \"r\", auth_user = \"u\", tls = \"none\" }\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(e),
            vec![
                "delivery.routes.*.auth_password_file",
                "delivery.routes.*.tls"
            ]
        );
    }

    #[test]
    fn the_hop_limit_is_checked() {
        assert_eq!(load("", &[]).unwrap().smtp.max_hops, 100);
        assert_eq!(
            load("[smtp]\nmax_hops = 30\n", &[]).unwrap().smtp.max_hops,
            30
        );
        let e = load("[smtp]\nmax_hops = 0\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.max_hops"]);
    }

    #[test]
    fn submission_needs_tls() {
        let e = load(
            "[smtp]\nsubmission = [\"127.0.0.1:587\"]\ntls_certificate = \"/nonexistent.pem\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["smtp.tls_key", "smtp.tls_certificate"]);
    }

    #[test]
    fn every_error_names_its_key() {
        let e = load(
            "hostnme = \"x\"\n[smtp]\nmax_recipients = 0\nfoo = 1\n[storage]\nendpoint = \"storage:1\"\nmailboxes = [\"a@elsewhere.org\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(e),
            vec![
                "hostnme",
                "smtp.foo",
                "smtp.max_recipients",
                "storage.endpoint",
                "storage.mailboxes[0]"
            ]
        );
    }

    #[test]
    fn type_errors_name_the_key_and_the_variable() {
        let e = load("[smtp]\nlisten = [\"nowhere\"]\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.listen[0]"]);
        let e = load("", &[("CORREU_SMTP_MAX_RECIPIENTS", "many")]).unwrap_err();
        assert_eq!(
            e.0[0].key,
            "smtp.max_recipients (from CORREU_SMTP_MAX_RECIPIENTS)"
        );
        let e = load("", &[("CORREU_NOPE", "1")]).unwrap_err();
        assert_eq!(e.0[0].key, "nope (from CORREU_NOPE)");
        let e = load("[queue]\npublish_timeout = \"10 parsecs\"\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["queue.publish_timeout"]);
        let e = load("[smtp\n", &[]).unwrap_err();
        assert!(e.0[0].message.starts_with("not valid TOML"), "{e}");
    }

    #[test]
    fn networks_and_durations() {
        let n: Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Network = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Network>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!(Network::LOOPBACK_V6.contains("::1".parse().unwrap()));
        assert_eq!(
            "250ms".parse::<Dur>().unwrap().get(),
            Duration::from_millis(250)
        );
        assert_eq!("5d".parse::<Dur>().unwrap(), Dur::secs(432_000));
        assert!("5y".parse::<Dur>().is_err());
        assert_eq!(split_host_port("[::1]:25"), Some(("::1".into(), 25)));
        assert_eq!(split_host_port("mx:x"), None);
        assert_eq!("120/1m".parse::<Rate>().unwrap(), Rate::per(120, 60));
        assert!("0".parse::<Rate>().unwrap().is_unlimited());
        assert!("120".parse::<Rate>().is_err());
        assert!("1/0s".parse::<Rate>().is_err());
    }
}
