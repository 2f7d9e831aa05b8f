//! The DNS resolver of a process: one, shared by inbound verification
//! (SPF, DKIM, ARC, DMARC) and delivery (MX, addresses, MTA-STS), so an
//! answer fetched for one is there for the other, kept for its TTL.

use std::sync::Mutex;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::TrustAnchors;

use crate::config::DnsConfig;

/// The settings a resolver was made with: server, cache size, and the
/// trust anchors when it validates DNSSEC.
type Key = (
    Option<std::net::SocketAddr>,
    usize,
    Option<Option<std::path::PathBuf>>,
);

/// Resolvers made so far, by the settings they were made with (one in a
/// service; tests may run several configurations in one process).
static RESOLVERS: Mutex<Vec<(Key, TokioResolver)>> = Mutex::new(Vec::new());

/// The process's resolver for these settings, made on first use. Clones
/// share one cache.
pub fn resolver(cfg: &DnsConfig) -> anyhow::Result<TokioResolver> {
    shared(cfg, false)
}

/// The process's DNSSEC-validating resolver (for DANE): every answer comes
/// with its proof (secure, insecure, bogus), checked from the trust
/// anchors of `dns.trust_anchor` or the IANA root keys.
pub fn validating_resolver(cfg: &DnsConfig) -> anyhow::Result<TokioResolver> {
    shared(cfg, true)
}

/// Trust anchors from the text of a file of DNSKEY records.
pub fn trust_anchors(text: &str) -> Result<TrustAnchors, String> {
    let anchors: TrustAnchors = text.parse().map_err(|e| format!("{e}"))?;
    if !text.contains("DNSKEY") {
        return Err("no DNSKEY record".into());
    }
    Ok(anchors)
}

fn shared(cfg: &DnsConfig, validate: bool) -> anyhow::Result<TokioResolver> {
    let key = (
        cfg.server,
        cfg.cache_size,
        validate.then(|| cfg.trust_anchor.clone()),
    );
    let mut made = RESOLVERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = made.iter().find(|(k, _)| *k == key) {
        return Ok(r.clone());
    }
    let r = build(cfg, validate)?;
    made.push((key, r.clone()));
    Ok(r)
}

/// A new resolver: the system's configuration, or the one server given.
fn build(cfg: &DnsConfig, validate: bool) -> anyhow::Result<TokioResolver> {
    let mut builder = match cfg.server {
        None => TokioResolver::builder_tokio()?,
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
    };
    // Answers are kept for their TTL (a record with TTL 0 is asked for
    // every time, as dnsmasq's local records are).
    builder.options_mut().cache_size = cfg.cache_size as u64;
    // Look names up as given: no search domains from resolv.conf.
    builder.options_mut().ndots = 0;
    if validate {
        builder.options_mut().validate = true;
        if let Some(path) = &cfg.trust_anchor {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("dns.trust_anchor: {}: {e}", path.display()))?;
            let anchors = trust_anchors(&text)
                .map_err(|e| anyhow::anyhow!("dns.trust_anchor: {}: {e}", path.display()))?;
            builder = builder.with_trust_anchor(std::sync::Arc::new(anchors));
        }
    }
    Ok(builder.build()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn trust_anchors_read_dnskey_records_as_dnssec_keygen_writes_them() {
        // A root KSK as `dnssec-keygen` prints it: class, flags 257, the
        // key split by a space.
        let text = ". IN DNSKEY 257 3 13 SPzUBUcN0ruFGqo2M6X2lfsSYJCdhW3DkAHuQqwxbUWrrvU7mffDwigP gsYl079VkRk7Vl8s8H2RRcgYEm07Kw==\n";
        let anchors = trust_anchors(text).unwrap();
        assert_eq!(anchors.len(), 1);
        assert!(trust_anchors("").is_err(), "an empty file names no key");
        assert!(trust_anchors(". IN DNSKEY 257 3 13 !!!\n").is_err());
    }
}
