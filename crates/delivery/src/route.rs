//! Where mail for a domain goes next: a configured route, or the domain's MX
//! hosts (RFC 5321 §5.1), or its own address when it has no MX.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use correu_runtime::config::{OutboundTls, Route};
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;

use crate::outcome::Outcome;

/// One host to try, in order; a configured route brings its TLS policy
/// and credentials along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub host: String,
    pub port: u16,
    pub route: Option<Route>,
    /// TLS for this hop when not `delivery.tls`: the route's, or required
    /// by the domain's MTA-STS policy.
    pub tls: Option<OutboundTls>,
}

pub struct Router {
    resolver: TokioResolver,
    routes: BTreeMap<String, Route>,
    mx_port: u16,
}

/// Sorts MX records by preference, shuffling equal ones (RFC 5321 §5.1).
pub fn order_mx(mut mx: Vec<(u16, String)>, rng: &mut impl rand::Rng) -> Vec<String> {
    mx.shuffle(rng);
    mx.sort_by_key(|(pref, _)| *pref);
    mx.into_iter().map(|(_, h)| h).collect()
}

impl Router {
    pub fn new(resolver: TokioResolver, routes: &BTreeMap<String, Route>, mx_port: u16) -> Self {
        let routes = routes
            .iter()
            .map(|(d, r)| (d.to_lowercase(), r.clone()))
            .collect();
        Router {
            resolver,
            routes,
            mx_port,
        }
    }

    /// The hops for `domain`, best first, or why there are none.
    pub async fn hops(&self, domain: &str) -> Result<Vec<Hop>, Outcome> {
        if let Some(route) = self.routes.get(domain).or_else(|| self.routes.get("*")) {
            return Ok(vec![Hop {
                host: route.host.clone(),
                port: route.port,
                tls: route.tls,
                route: Some(route.clone()),
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                // RFC 7505: a single MX of "." says the domain takes no mail.
                if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
                    return Err(Outcome::perm(
                        "5.1.10",
                        format!("{domain} accepts no mail (null MX, RFC 7505)"),
                    ));
                }
                if mx.is_empty() {
                    return Ok(vec![self.implicit(domain)]);
                }
                let hosts = order_mx(mx, &mut rand::rng());
                Ok(hosts
                    .into_iter()
                    .filter(|h| h != ".")
                    .map(|h| Hop {
                        host: h.trim_end_matches('.').to_string(),
                        port: self.mx_port,
                        route: None,
                        tls: None,
                    })
                    .collect())
            }
            // No MX: the domain's own address is the implicit MX (RFC 5321 §5.1).
            Err(e) if e.is_nx_domain() => Err(Outcome::perm(
                "5.1.2",
                format!("domain {domain} does not exist"),
            )),
            Err(e) if e.is_no_records_found() => Ok(vec![self.implicit(domain)]),
            Err(e) => Err(Outcome::temp(
                "4.4.3",
                format!("MX lookup for {domain} failed: {e}"),
            )),
        }
    }

    fn implicit(&self, domain: &str) -> Hop {
        Hop {
            host: domain.to_string(),
            port: self.mx_port,
            route: None,
            tls: None,
        }
    }

    /// The addresses of a hop's host (an IP literal is itself).
    pub async fn addresses(&self, hop: &Hop) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = hop.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, hop.port)]);
        }
        let fqdn = format!("{}.", hop.host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, hop.port)).collect()),
            Err(source) => Err(ResolveError {
                host: hop.host.clone(),
                source,
            }),
        }
    }
}

/// A host name that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {source}")]
pub struct ResolveError {
    pub host: String,
    #[source]
    pub source: hickory_resolver::net::NetError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mx_by_preference_with_equal_ones_shuffled() {
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..32 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let order = order_mx(
                vec![
                    (20, "c".into()),
                    (10, "a".into()),
                    (10, "b".into()),
                    (5, "z".into()),
                ],
                &mut rng,
            );
            assert_eq!(order[0], "z");
            assert_eq!(order[3], "c");
            seen_first.insert(order[1].clone());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences must be shuffled");
    }
}
