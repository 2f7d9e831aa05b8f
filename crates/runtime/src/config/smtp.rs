//! `[smtp]`: the listeners, limits and timeouts of ingress's SMTP sessions.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::{Dur, Network, Rate, one_or_many};

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Time for a whole command to arrive, from its first byte (or the end
    /// of the one before) to its line end (RFC 5321 §4.5.3.2.7: 5 minutes).
    /// It is not renewed by each byte: one byte every few seconds does not
    /// keep a connection.
    pub command_timeout: Dur,
    /// Time to wait for each chunk of DATA (RFC 5321 §4.5.3.2.5: 3 minutes).
    pub data_timeout: Dur,
    /// Slowest a message may come, in bytes per second, once it has had
    /// `data_timeout`: a DATA or BDAT transfer must end by `data_timeout`
    /// plus its bytes at this rate (Postfix's `smtpd_min_data_rate`); 0
    /// for no floor.
    pub min_data_rate: u64,
    /// Time for storage to say whether a local recipient exists.
    pub recipient_check_timeout: Dur,
    /// How long a local recipient storage said exists is taken as existing
    /// without asking again (0: ask at every RCPT).
    pub recipient_cache: Dur,
    /// Time sessions in progress get to finish when the server stops.
    pub shutdown_grace: Dur,
    /// After SIGTERM, the listeners stay open at least this long, answering
    /// every new connection `421 4.3.2`, while load balancers and
    /// kube-proxy stop sending clients to a pod that turned not ready (a
    /// port that closed at once would refuse them instead).
    pub drain_delay: Dur,
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
    /// A failed AUTH is answered after this, doubled at each failure from
    /// the same address in the window, up to 30 times it.
    pub auth_failure_delay: Dur,
    /// Failed AUTHs from one client address (`N/DURATION`); past it the
    /// address gets `421 4.7.0` at AUTH until the window ends. Shared by
    /// every ingress replica through Redis.
    pub auth_client_failures: Rate,
    /// Failed AUTHs for one account from anywhere; past it every AUTH for
    /// that account waits the longest delay first (the right password
    /// still works: the account is slowed down, never locked out).
    pub auth_account_failures: Rate,
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
            min_data_rate: 500,
            recipient_check_timeout: Dur::secs(5),
            recipient_cache: Dur::secs(10),
            shutdown_grace: Dur::secs(25),
            drain_delay: Dur::secs(0),
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
            auth_failure_delay: Dur::secs(1),
            auth_client_failures: Rate::per(10, 900),
            auth_account_failures: Rate::per(20, 900),
        }
    }
}

impl SmtpConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        let s = self;
        // Storage takes messages up to this size from delivery, so it
        // checks it too.
        if s.max_message_size == 0 {
            c.err("smtp.max_message_size", "must be more than 0");
        }
        if !c.role.runs_ingress() {
            return;
        }
        if s.listen.is_empty() {
            c.err("smtp.listen", "at least one address is needed");
        }
        for (key, v) in [
            ("smtp.max_recipients", s.max_recipients),
            ("smtp.max_errors", s.max_errors),
            ("smtp.max_connections", s.max_connections),
            ("smtp.max_transactions", s.max_transactions),
            (
                "smtp.max_connections_per_client",
                s.max_connections_per_client,
            ),
        ] {
            if v == 0 {
                c.err(key, "must be more than 0");
            }
        }
        if s.max_line_length < 512 {
            c.err(
                "smtp.max_line_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)",
            );
        }
        if s.max_hops == 0 {
            c.err(
                "smtp.max_hops",
                "must be more than 0 (RFC 5321 §6.3 advises at least 100)",
            );
        }
        if s.max_text_line != 0 && s.max_text_line < 1000 {
            c.err(
                "smtp.max_text_line",
                "must be 0 (no limit) or at least 1000 (RFC 5321 §4.5.3.1.6)",
            );
        }
        match (&s.tls_certificate, &s.tls_key) {
            (Some(_), None) => c.err("smtp.tls_key", "needed with smtp.tls_certificate"),
            (None, Some(_)) => c.err("smtp.tls_certificate", "needed with smtp.tls_key"),
            _ => {}
        }
        for (key, addrs) in [
            ("smtp.submission", &s.submission),
            ("smtp.submissions", &s.submissions),
        ] {
            if !addrs.is_empty() && s.tls_certificate.is_none() {
                c.err(
                    key,
                    "submission needs TLS: set smtp.tls_certificate and smtp.tls_key",
                );
            }
        }
        for (key, path) in [
            ("smtp.tls_certificate", &s.tls_certificate),
            ("smtp.tls_key", &s.tls_key),
            ("smtp.auth_file", &s.auth_file),
        ] {
            if let Some(p) = path {
                c.readable_file(key, p);
            }
        }
    }
}
