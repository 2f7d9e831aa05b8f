//! `[delivery]`: how mail leaves: routes, TLS, MTA-STS, DKIM, limits per
//! destination, timeouts and bounces.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::Check;
use super::values::{Dur, Rate, is_domain, split_host_port};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DeliveryConfig {
    /// Messages delivered at once by one delivery process.
    pub concurrency: usize,
    /// Port of remote MX hosts (25; another only for tests and labs).
    pub mx_port: u16,
    /// Fixed next hops by domain (`"*"` for all) instead of MX: `host:port`,
    /// or a table with `host`, `port`, `tls`, `auth_user`,
    /// `auth_password_file` (a smarthost).
    pub routes: BTreeMap<String, Route>,
    /// TLS to other servers: `opportunistic` (STARTTLS whenever offered,
    /// certificate not checked), `dane` (authenticated by the MX host's
    /// DNSSEC-signed TLSA records where it has them, else opportunistic),
    /// `required` (verified against CAs, else the message waits) or `none`.
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
    /// A deadline per phase of an SMTP session with a remote host.
    pub timeouts: ClientTimeouts,
    /// Longest one delivery attempt of a message may take; recipients not
    /// done by then are retried. Keep it under RabbitMQ's
    /// `consumer_timeout` (30 minutes by default), which closes consumers
    /// that hold a message longer.
    pub attempt_timeout: Dur,
    /// Recipients that bounced hard, refused at once for a while.
    pub suppression: SuppressionConfig,
    /// Traffic shaping per destination, by name (a "site"): rules that
    /// match recipient domains or MX host names and set their own limits,
    /// shared by every host they match. The settings above are the
    /// defaults for everything no rule matches.
    pub shaping: BTreeMap<String, Shape>,
    /// TLS reports (RFC 8460) to the domains that ask for them.
    pub tls_reports: TlsReportsConfig,
}

/// `[delivery.tls_reports]`: the outcome of TLS with each remote domain's
/// MX hosts is counted per day (in Redis, across delivery processes), and
/// each domain that publishes `_smtp._tls` (`v=TLSRPTv1; rua=...`) gets the
/// day's aggregate report (RFC 8460) after midnight UTC, by mail through
/// Correu's own queue or by HTTPS POST.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsReportsConfig {
    pub enabled: bool,
    /// `organization-name` in the reports (default: `hostname`).
    pub organization: String,
    /// `contact-info` (default: `postmaster@` and `hostname`).
    pub contact: String,
}

/// `[delivery.shaping.NAME]`: one destination's budget, as KumoMTA's
/// shaping rules and site names give it. A delivery to a recipient domain
/// in `domains`, or to an MX host that `mx` matches, counts against this
/// rule, across every delivery process (Redis): all `*.google.com` hosts
/// share one budget when `mx = ["*.google.com"]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shape {
    /// Recipient domains (`example.com`, or `*.example.com` for its
    /// subdomains).
    pub domains: Vec<String>,
    /// MX host names (`mx.example.com`, or `*.example.com`).
    pub mx: Vec<String>,
    /// Connections open at once to the whole site.
    pub max_connections: usize,
    /// Transactions one connection carries before it is closed (0: no
    /// limit).
    pub max_messages_per_connection: u64,
    /// Messages to the site (`N/DURATION`, 0 for no limit).
    pub message_rate: Rate,
    /// New connections to the site (`N/DURATION`, 0 for no limit).
    pub connection_rate: Rate,
    /// TLS to the site's hosts (unset: `delivery.tls`); a route's own
    /// setting, MTA-STS and REQUIRETLS still decide first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// How long a connection is kept idle for the next message (unset:
    /// `delivery.connection_idle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_idle: Option<Dur>,
    /// How long the site is left alone after it answers `421` or a `4xx`
    /// that says to slow down.
    pub backoff: Dur,
    /// The delay before each retry of a message to the site, the last
    /// repeating (empty: `queue.retry_delays` in order); each is served by
    /// the shortest retry tier that waits at least as long.
    pub retry_delays: Vec<Dur>,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            domains: Vec::new(),
            mx: Vec::new(),
            max_connections: 10,
            max_messages_per_connection: 0,
            message_rate: Rate::per(0, 1),
            connection_rate: Rate::per(0, 1),
            tls: None,
            connection_idle: None,
            backoff: Dur::secs(60),
            retry_delays: Vec::new(),
        }
    }
}

/// Whether `name` (a domain or host name) matches `pattern`: the same
/// name, or for `*.example.com` any name under example.com. Both are
/// compared without case and without a trailing dot.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    let pattern = pattern.trim_end_matches('.');
    // Bytes, not characters: a name may be UTF-8 (SMTPUTF8), and a byte
    // offset inside a character must not be sliced at.
    let (name, pattern) = (name.as_bytes(), pattern.as_bytes());
    match pattern.strip_prefix(b"*.") {
        Some(parent) => {
            name.len() > parent.len() + 1
                && name[name.len() - parent.len()..].eq_ignore_ascii_case(parent)
                && name[name.len() - parent.len() - 1] == b'.'
        }
        None => name.eq_ignore_ascii_case(pattern),
    }
}

/// `[delivery.suppression]`: a recipient whose delivery failed for good
/// with one of `classes` is put on a list shared through Redis (or kept in
/// `<queue.spool>/suppressed` for `correu serve`) for `ttl`; later messages
/// to it fail at once with a DSN that says so, without a connection.
/// `correu suppression list|add|remove` edits the list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuppressionConfig {
    pub enabled: bool,
    /// How long a recipient stays on the list.
    pub ttl: Dur,
    /// The bounce classes that put a recipient on it.
    pub classes: Vec<String>,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            enabled: true,
            ttl: Dur::secs(30 * 86_400),
            classes: vec!["invalid_recipient".into()],
        }
    }
}

/// Bounce classes (what kind of failure it was), as events, logs and
/// `delivery.suppression.classes` name them.
pub const BOUNCE_CLASSES: [&str; 12] = [
    "invalid_recipient",
    "mailbox_full",
    "message_too_large",
    "policy",
    "spam",
    "rate_limited",
    "dns",
    "tls",
    "connection",
    "suppressed",
    "expired",
    "other",
];

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 16,
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
            timeouts: ClientTimeouts::default(),
            attempt_timeout: Dur::secs(15 * 60),
            suppression: SuppressionConfig::default(),
            shaping: BTreeMap::new(),
            tls_reports: TlsReportsConfig::default(),
        }
    }
}

/// `[delivery.timeouts]`: how long each phase of a session with a remote
/// host may take, named as KumoMTA names them; a timeout error names its
/// phase. Defaults from RFC 5321 §4.5.3.2 where it gives one.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(default)]
pub struct ClientTimeouts {
    /// The TCP connection.
    pub connect: Dur,
    /// The `220` greeting (§4.5.3.2.1: 5 minutes).
    pub banner: Dur,
    /// The reply to EHLO or HELO (and to AUTH).
    pub ehlo: Dur,
    /// STARTTLS's reply and the TLS handshake.
    pub starttls: Dur,
    /// The reply to MAIL (§4.5.3.2.2: 5 minutes), and to RSET and QUIT.
    pub mail: Dur,
    /// Each reply to RCPT (§4.5.3.2.3: 5 minutes).
    pub rcpt: Dur,
    /// The `354` after DATA (§4.5.3.2.4: 2 minutes).
    pub data: Dur,
    /// Sending the message and the reply after its final dot
    /// (§4.5.3.2.6: 10 minutes).
    pub data_end: Dur,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            connect: Dur::secs(30),
            banner: Dur::secs(300),
            ehlo: Dur::secs(300),
            starttls: Dur::secs(60),
            mail: Dur::secs(300),
            rcpt: Dur::secs(300),
            data: Dur::secs(120),
            data_end: Dur::secs(600),
        }
    }
}

/// A DKIM signing key (`correu dkim keygen` makes one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub selector: String,
    /// The private key, PEM: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    pub key_file: PathBuf,
    #[serde(default = "DkimAlgorithm::default_rsa")]
    pub algorithm: DkimAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    None,
    Opportunistic,
    Required,
    /// DANE (RFC 7672): where the MX host's TLSA records are published in
    /// DNSSEC-signed zones, TLS authenticated by them or no delivery; else
    /// opportunistic. Delivery validates DNSSEC when any hop may use it.
    Dane,
}

impl DeliveryConfig {
    /// Whether any hop may be DANE (the default, a route or a shaping
    /// rule): then delivery's DNS answers are DNSSEC-validated.
    pub fn uses_dane(&self) -> bool {
        self.tls == OutboundTls::Dane
            || self
                .routes
                .values()
                .any(|r| r.tls == Some(OutboundTls::Dane))
            || self
                .shaping
                .values()
                .any(|s| s.tls == Some(OutboundTls::Dane))
    }
}

/// A fixed next hop for a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub host: String,
    pub port: u16,
    /// Overrides `delivery.tls` for this hop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// AUTH PLAIN with the relay (after TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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

impl DeliveryConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        if !c.role.runs_delivery() {
            return;
        }
        let d = self;
        if d.concurrency == 0 {
            c.err("delivery.concurrency", "must be more than 0");
        }
        if d.max_connections_per_host == 0 {
            c.err("delivery.max_connections_per_host", "must be more than 0");
        }
        let t = &d.timeouts;
        for (key, v) in [
            ("connect", t.connect),
            ("banner", t.banner),
            ("ehlo", t.ehlo),
            ("starttls", t.starttls),
            ("mail", t.mail),
            ("rcpt", t.rcpt),
            ("data", t.data),
            ("data_end", t.data_end),
        ] {
            if v.get().is_zero() {
                c.err(format!("delivery.timeouts.{key}"), "must be more than 0");
            }
        }
        if d.attempt_timeout.get().is_zero() || d.attempt_timeout > Dur::secs(25 * 60) {
            c.err(
                "delivery.attempt_timeout",
                "must be more than 0 and at most 25m (RabbitMQ closes consumers that hold a message 30m)",
            );
        }
        for (i, class) in d.suppression.classes.iter().enumerate() {
            if !BOUNCE_CLASSES.contains(&class.as_str()) {
                c.err(
                    format!("delivery.suppression.classes[{i}]"),
                    format!("`{class}` is not one of {}", BOUNCE_CLASSES.join(", ")),
                );
            }
        }
        if d.suppression.enabled && d.suppression.ttl.get().is_zero() {
            c.err("delivery.suppression.ttl", "must be more than 0");
        }
        for (name, shape) in &d.shaping {
            let key = format!("delivery.shaping.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                c.err(&key, "a name of letters, digits, `-`, `_` and `.`");
            }
            if shape.domains.is_empty() && shape.mx.is_empty() {
                c.err(&key, "needs `domains` or `mx` to match anything");
            }
            for (field, list) in [("domains", &shape.domains), ("mx", &shape.mx)] {
                for (i, p) in list.iter().enumerate() {
                    if !is_domain(p.strip_prefix("*.").unwrap_or(p)) {
                        c.err(
                            format!("{key}.{field}[{i}]"),
                            format!("`{p}` is not a name or `*.name`"),
                        );
                    }
                }
            }
            if shape.max_connections == 0 {
                c.err(format!("{key}.max_connections"), "must be more than 0");
            }
            for (i, d) in shape.retry_delays.iter().enumerate() {
                if d.get().is_zero() {
                    c.err(format!("{key}.retry_delays[{i}]"), "must be more than 0s");
                }
            }
        }
        for (domain, route) in &d.routes {
            let key = format!("delivery.routes.{domain}");
            if domain != "*" && !is_domain(domain) {
                c.err(&key, "key must be a domain or \"*\"");
            }
            if route.host.is_empty() {
                c.err(format!("{key}.host"), "must not be empty");
            }
            match (&route.auth_user, &route.auth_password_file) {
                (Some(_), None) => {
                    c.err(format!("{key}.auth_password_file"), "needed with auth_user")
                }
                (None, Some(_)) => {
                    c.err(format!("{key}.auth_user"), "needed with auth_password_file")
                }
                (Some(_), Some(p)) => c.readable_file(format!("{key}.auth_password_file"), p),
                _ => {}
            }
            if route.auth_user.is_some() && route.tls.unwrap_or(d.tls) == OutboundTls::None {
                c.err(
                    format!("{key}.tls"),
                    "AUTH needs TLS: passwords are never sent in the clear",
                );
            }
        }
        for (domain, k) in &d.dkim {
            if !is_domain(domain) {
                c.err(format!("delivery.dkim.{domain}"), "key must be a domain");
            }
            if k.selector.is_empty()
                || !k
                    .selector
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
            {
                c.err(
                    format!("delivery.dkim.{domain}.selector"),
                    "letters, digits, '-', '_' and '.' only",
                );
            }
            c.readable_file(format!("delivery.dkim.{domain}.key_file"), &k.key_file);
        }
        if let Some(p) = &d.tls_ca_file {
            c.readable_file("delivery.tls_ca_file", p);
        }
    }
}
