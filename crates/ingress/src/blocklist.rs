//! DNS blocklists: a client address listed in DNSBL zones (asked at
//! connect, before the greeting) or a sender or HELO domain listed in
//! RHSBL zones (asked once the message is in) is refused with
//! `554 5.7.1` naming the lists, when the weights of the lists that name
//! it reach `inbound.blocklist_threshold`. A list that cannot be asked
//! (timeout, SERVFAIL) names nobody: blocklists fail open.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use correu_runtime::config::{Blocklist, BlocklistKind, InboundConfig};
use correu_smtp::{Enhanced, Reply};
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use opentelemetry::KeyValue;

pub struct Blocklists {
    resolver: TokioResolver,
    lists: Vec<Blocklist>,
    threshold: f64,
    timeout: Duration,
}

/// A list that named what was asked, with its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub zone: String,
    pub subject: String,
    pub answer: Ipv4Addr,
}

impl Blocklists {
    /// `None` when no list is configured.
    pub fn new(cfg: &InboundConfig, resolver: TokioResolver) -> Option<Self> {
        (!cfg.blocklists.is_empty()).then(|| Blocklists {
            resolver,
            lists: cfg.blocklists.clone(),
            threshold: cfg.blocklist_threshold,
            timeout: cfg.timeout.get(),
        })
    }

    /// The refusal for a client address its lists name, if they weigh
    /// enough.
    pub async fn client(&self, ip: IpAddr) -> Option<(Reply, Vec<Listing>)> {
        let subject = ip.to_string();
        let names: Vec<(usize, String)> = self
            .of_kind(BlocklistKind::Ip)
            .map(|(i, b)| (i, format!("{}.{}.", reversed(ip), b.zone)))
            .collect();
        let listed = self.ask(names, &subject).await;
        self.verdict(listed, |zones| {
            format!("Error: client [{subject}] is listed by {zones}")
        })
    }

    /// The refusal for sender or HELO domains their lists name, if they
    /// weigh enough (each list counts once).
    pub async fn domains(&self, domains: &[&str]) -> Option<(Reply, Vec<Listing>)> {
        let mut names = Vec::new();
        for (i, b) in self.of_kind(BlocklistKind::Domain) {
            for d in domains {
                let d = d.trim_end_matches('.');
                if !d.is_empty() && !d.starts_with('[') {
                    names.push((i, format!("{d}.{}.", b.zone)));
                }
            }
        }
        let listed = self.ask(names, "").await;
        self.verdict(listed, |zones| {
            format!("Error: a domain of this message is listed by {zones}")
        })
    }

    fn of_kind(&self, kind: BlocklistKind) -> impl Iterator<Item = (usize, &Blocklist)> {
        self.lists
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.kind == kind)
    }

    /// Asks every name at once; the lists (by index) that listed one.
    async fn ask(&self, names: Vec<(usize, String)>, subject: &str) -> Vec<(usize, Listing)> {
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in names {
            let resolver = self.resolver.clone();
            let wait = self.timeout;
            set.spawn(async move {
                let answers = tokio::time::timeout(wait, resolver.ipv4_lookup(name.as_str())).await;
                (i, name, answers)
            });
        }
        let mut listed = Vec::new();
        while let Some(joined) = set.join_next().await {
            let Ok((i, name, answers)) = joined else {
                continue;
            };
            let b = &self.lists[i];
            let answers: Vec<Ipv4Addr> = match answers {
                Ok(Ok(lookup)) => lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect(),
                Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => Vec::new(),
                Ok(Err(e)) => {
                    tracing::warn!(zone = %b.zone, error = %e, "blocklist lookup failed; not listed");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!(zone = %b.zone, "blocklist lookup timed out; not listed");
                    Vec::new()
                }
            };
            if let Some(answer) = answers.into_iter().find(|a| counts(*a, &b.codes)) {
                let subject = if subject.is_empty() {
                    name.trim_end_matches('.')
                        .strip_suffix(b.zone.as_str())
                        .unwrap_or(&name)
                        .trim_end_matches('.')
                        .to_string()
                } else {
                    subject.to_string()
                };
                listed.push((
                    i,
                    Listing {
                        zone: b.zone.clone(),
                        subject,
                        answer,
                    },
                ));
            }
        }
        listed.sort_by_key(|(i, _)| *i);
        listed
    }

    /// Weighs the lists that listed something (each list once) and counts
    /// them in metrics; the refusal when they reach the threshold.
    fn verdict(
        &self,
        listed: Vec<(usize, Listing)>,
        text: impl Fn(&str) -> String,
    ) -> Option<(Reply, Vec<Listing>)> {
        let mut seen = Vec::new();
        let mut score = 0.0;
        for (i, l) in &listed {
            if !seen.contains(i) {
                seen.push(*i);
                score += self.lists[*i].weight;
            }
            crate::metrics::METRICS
                .blocklist_hits
                .add(1, &[KeyValue::new("zone", l.zone.clone())]);
        }
        if listed.is_empty() || score < self.threshold {
            return None;
        }
        let zones: Vec<&str> = seen.iter().map(|i| self.lists[*i].zone.as_str()).collect();
        let reply = Reply::new(554, Enhanced(5, 7, 1), text(&zones.join(", ")));
        Some((reply, listed.into_iter().map(|(_, l)| l).collect()))
    }
}

/// The name an address is asked under: IPv4 octets reversed
/// (`4.3.2.1`), IPv6 nibbles reversed (RFC 5782 §2.4).
pub fn reversed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => reversed(IpAddr::V4(v4)),
            None => {
                let mut parts = Vec::with_capacity(32);
                for b in v6.octets().iter().rev() {
                    parts.push(format!("{:x}", b & 0x0f));
                    parts.push(format!("{:x}", b >> 4));
                }
                parts.join(".")
            }
        },
    }
}

/// Whether an answer means "listed": one of `codes`, or with none given,
/// any 127.0.0.0/8 address but 127.255.255.0/24 (refused queries, as
/// Spamhaus answers public resolvers).
pub fn counts(answer: Ipv4Addr, codes: &[Ipv4Addr]) -> bool {
    if !codes.is_empty() {
        return codes.contains(&answer);
    }
    let o = answer.octets();
    o[0] == 127 && !(o[1] == 255 && o[2] == 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_asked_reversed() {
        assert_eq!(reversed("192.0.2.99".parse().unwrap()), "99.2.0.192");
        assert_eq!(
            reversed("2001:db8:1:2::abcd".parse().unwrap()),
            "d.c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
        );
        assert_eq!(reversed("::ffff:192.0.2.1".parse().unwrap()), "1.2.0.192");
    }

    #[test]
    fn which_answers_list() {
        let any: &[Ipv4Addr] = &[];
        assert!(counts("127.0.0.2".parse().unwrap(), any));
        assert!(counts("127.0.1.4".parse().unwrap(), any));
        assert!(!counts("127.255.255.254".parse().unwrap(), any));
        assert!(!counts("10.0.0.1".parse().unwrap(), any));
        let only = ["127.0.0.4".parse().unwrap()];
        assert!(counts("127.0.0.4".parse().unwrap(), &only));
        assert!(!counts("127.0.0.2".parse().unwrap(), &only));
    }
}
