//! Where mail for a domain goes next: a configured route, or the domain's MX
//! hosts (RFC 5321 §5.1), or its own address when it has no MX.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use correu_runtime::config::{OutboundTls, Route};
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{RData, RecordType};
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
    /// The host's name is DNSSEC-authenticated as far as the domain's MX
    /// records go: they were validated secure, or the operator named the
    /// host (a route). Its addresses are checked when they are looked up.
    pub secure: bool,
    /// The host's DANE policy, once its TLSA records are known.
    pub dane: Option<crate::dane::Policy>,
}

pub struct Router {
    /// DNSSEC-validating when `validating`.
    pub resolver: TokioResolver,
    validating: bool,
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
    pub fn new(
        resolver: TokioResolver,
        validating: bool,
        routes: &BTreeMap<String, Route>,
        mx_port: u16,
    ) -> Self {
        let routes = routes
            .iter()
            .map(|(d, r)| (d.to_lowercase(), r.clone()))
            .collect();
        Router {
            resolver,
            validating,
            routes,
            mx_port,
        }
    }

    /// Whether answers are DNSSEC-validated (some hop may be DANE).
    pub fn validating(&self) -> bool {
        self.validating
    }

    /// The hops for `domain`, best first, or why there are none.
    pub async fn hops(&self, domain: &str) -> Result<Vec<Hop>, Outcome> {
        if let Some(route) = self.routes.get(domain).or_else(|| self.routes.get("*")) {
            return Ok(vec![Hop {
                host: route.host.clone(),
                port: route.port,
                tls: route.tls,
                route: Some(route.clone()),
                secure: true,
                dane: None,
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                // RFC 7672 §2.2.1: a bogus MX answer is a failed lookup.
                if self.validating && crate::dane::bogus(lookup.answers()) {
                    return Err(Outcome::temp(
                        "4.4.3",
                        format!("the MX records of {domain} failed DNSSEC validation"),
                    ));
                }
                let secure = self.validating && crate::dane::secure(lookup.answers());
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
                        secure,
                        dane: None,
                    })
                    .collect())
            }
            Err(e) if crate::dane::bogus_error(&e) => Err(Outcome::temp(
                "4.4.3",
                format!("the MX records of {domain} failed DNSSEC validation"),
            )),
            // No MX: the domain's own address is the implicit MX (RFC 5321 §5.1).
            Err(e) if e.is_nx_domain() || crate::dane::unproven_denial(&e) == Some(true) => Err(
                Outcome::perm("5.1.2", format!("domain {domain} does not exist")),
            ),
            Err(e) if e.is_no_records_found() || crate::dane::unproven_denial(&e).is_some() => {
                Ok(vec![self.implicit(domain)])
            }
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
            // The "no MX" answer's proof is not kept (hickory gives the
            // same error for a proven and an insecure denial): not
            // authenticated, so no DANE and no REQUIRETLS by DNSSEC.
            secure: false,
            dane: None,
        }
    }

    /// The addresses of a hop's host (an IP literal is itself), and
    /// whether DNSSEC proved them secure (never for a literal: DANE needs
    /// a name).
    pub async fn addresses(&self, hop: &Hop) -> Result<(Vec<SocketAddr>, bool), ResolveError> {
        if let Ok(ip) = hop.host.parse::<IpAddr>() {
            return Ok((vec![SocketAddr::new(ip, hop.port)], false));
        }
        let fqdn = format!("{}.", hop.host.trim_end_matches('.'));
        if self.validating {
            return self.validated_addresses(hop, &fqdn).await;
        }
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok((
                ips.iter().map(|ip| SocketAddr::new(ip, hop.port)).collect(),
                false,
            )),
            Err(source) => Err(ResolveError::Lookup {
                host: hop.host.clone(),
                source,
            }),
        }
    }

    /// A and AAAA asked apart, so a bogus answer to either is seen (the
    /// dual lookup would go on to the other and hide it).
    async fn validated_addresses(
        &self,
        hop: &Hop,
        fqdn: &str,
    ) -> Result<(Vec<SocketAddr>, bool), ResolveError> {
        let (v4, v6) = tokio::join!(
            self.resolver.lookup(fqdn, RecordType::A),
            self.resolver.lookup(fqdn, RecordType::AAAA)
        );
        let mut addrs = Vec::new();
        let mut secure = true;
        let mut failed = None;
        for answer in [v4, v6] {
            match answer {
                Ok(l) => {
                    if crate::dane::bogus(l.answers()) {
                        return Err(ResolveError::Bogus(hop.host.clone()));
                    }
                    secure &= crate::dane::secure(l.answers());
                    addrs.extend(l.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), hop.port)),
                        RData::AAAA(a) => Some(SocketAddr::new(IpAddr::V6(a.0), hop.port)),
                        _ => None,
                    }));
                }
                Err(e) if crate::dane::bogus_error(&e) => {
                    return Err(ResolveError::Bogus(hop.host.clone()));
                }
                Err(e) if e.is_no_records_found() || crate::dane::unproven_denial(&e).is_some() => {
                }
                Err(e) => failed = Some(e),
            }
        }
        let secure = secure && !addrs.is_empty();
        match failed {
            Some(source) if addrs.is_empty() => Err(ResolveError::Lookup {
                host: hop.host.clone(),
                source,
            }),
            _ => Ok((addrs, secure)),
        }
    }
}

/// A host name that did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
    #[error("the addresses of {0} failed DNSSEC validation")]
    Bogus(String),
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
