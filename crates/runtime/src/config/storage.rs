//! `[storage]`: where the mailboxes are, who has one, and how the other
//! services reach storage.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::{Dur, Size, one_or_many};

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// A file holding the secret that signs SRS addresses: mail an alias
    /// forwards to another domain goes out from `SRS0=…@alias-domain`, so
    /// SPF passes at the next hop and bounces come back here to be sent
    /// on. Every ingress replica needs the same file. Without one,
    /// forwarded mail keeps its sender, as Postfix's aliases do.
    pub srs_secret_file: Option<PathBuf>,
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
            srs_secret_file: None,
            default_quota: Size(0),
            request_timeout: Dur::secs(10),
        }
    }
}

impl StorageConfig {
    pub(crate) fn validate(&self, domains: &[String], c: &mut Check) {
        let st = self;
        if c.role.calls_storage()
            && !(st.endpoint.starts_with("http://") || st.endpoint.starts_with("https://"))
        {
            c.err("storage.endpoint", "must be a URL like http://storage:2526");
        }
        if let Some(f) = &st.srs_secret_file
            && c.role.runs_ingress()
        {
            c.readable_file("storage.srs_secret_file", f);
        }
        if !c.role.runs_storage() {
            return;
        }
        for (i, m) in st.mailboxes.iter().enumerate() {
            match m.rsplit_once('@') {
                Some((local, domain))
                    if !local.is_empty()
                        && domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) => {}
                _ => c.err(
                    format!("storage.mailboxes[{i}]"),
                    format!("`{m}` is not an address in one of `domains`"),
                ),
            }
        }
    }
}
