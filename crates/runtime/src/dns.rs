//! The DNS resolver of a process: one, shared by inbound verification
//! (SPF, DKIM, ARC, DMARC) and delivery (MX, addresses, MTA-STS), so an
//! answer fetched for one is there for the other, kept for its TTL.

use std::sync::Mutex;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::DnsConfig;

/// The settings a resolver was made with: server and cache size.
type Key = (Option<std::net::SocketAddr>, usize);

/// Resolvers made so far, by the settings they were made with (one in a
/// service; tests may run several configurations in one process).
static RESOLVERS: Mutex<Vec<(Key, TokioResolver)>> = Mutex::new(Vec::new());

/// The process's resolver for these settings, made on first use. Clones
/// share one cache.
pub fn resolver(cfg: &DnsConfig) -> anyhow::Result<TokioResolver> {
    let key = (cfg.server, cfg.cache_size);
    let mut made = RESOLVERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = made.iter().find(|(k, _)| *k == key) {
        return Ok(r.clone());
    }
    let r = build(cfg)?;
    made.push((key, r.clone()));
    Ok(r)
}

/// A new resolver: the system's configuration, or the one server given.
fn build(cfg: &DnsConfig) -> anyhow::Result<TokioResolver> {
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
    Ok(builder.build()?)
}
