//! `[dns]`: the one resolver of a process, shared by inbound verification
//! (SPF, DKIM, DMARC, ARC) and delivery (MX, addresses, MTA-STS), caching
//! answers for as long as their TTL says.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DnsConfig {
    /// One DNS server (`host:port`) to ask; unset: the system's
    /// (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    /// Answers kept (each for its TTL); `0` asks every time.
    pub cache_size: usize,
    /// DNSSEC trust anchors, a file of DNSKEY records (as `dig DNSKEY .`
    /// prints them), used where delivery validates DNSSEC (DANE); unset:
    /// the IANA root keys built in.
    pub trust_anchor: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            server: None,
            cache_size: 4096,
            trust_anchor: None,
        }
    }
}

impl DnsConfig {
    pub(crate) fn validate(&self, c: &mut Check) {
        if let Some(s) = self.server
            && s.port() == 0
        {
            c.err("dns.server", "needs a port other than 0 (53 for DNS)");
        }
        if let Some(p) = &self.trust_anchor {
            match std::fs::read_to_string(p) {
                Err(e) => c.err("dns.trust_anchor", format!("{}: {e}", p.display())),
                Ok(text) => {
                    if let Err(e) = crate::dns::trust_anchors(&text) {
                        c.err("dns.trust_anchor", format!("{}: {e}", p.display()));
                    }
                }
            }
        }
    }
}
