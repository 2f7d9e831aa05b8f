//! Traffic shaping per destination (`[delivery.shaping.NAME]`): which
//! budget a delivery to a domain through an MX host counts against, and
//! that budget's limits. A rule naming the recipient domain wins, then a
//! rule whose `mx` patterns match the host (rules in name order); with no
//! rule, the host is its own budget under the global settings, as before.
//!
//! Every limit is shared by the delivery processes through Redis:
//! connections are leases on `conn:<budget>`, rates fixed-window counters,
//! and a destination that says to slow down (`421`, or a `4xx` whose
//! words say so) is held off for its `backoff` on `hold:backoff:<budget>`.

use std::time::Duration;

use correu_runtime::config::{DeliveryConfig, OutboundTls, Rate, Shape, name_matches};

use crate::outcome::Outcome;

/// How long a host no rule covers is left alone after it says to slow
/// down.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(60);

/// The limits of one delivery's destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Dest {
    /// What the limits are counted on: `site:<rule>` or the host name.
    pub budget: String,
    /// The rule's name, when one matched (logs).
    pub site: Option<String>,
    pub max_connections: usize,
    /// 0: no limit.
    pub max_messages_per_connection: u64,
    pub message_rate: Rate,
    pub connection_rate: Rate,
    pub tls: Option<OutboundTls>,
    pub idle: Duration,
    pub backoff: Duration,
}

pub struct Shaping {
    rules: Vec<(String, Shape)>,
    max_per_host: usize,
    idle: Duration,
}

impl Shaping {
    pub fn new(cfg: &DeliveryConfig) -> Shaping {
        Shaping {
            rules: cfg
                .shaping
                .iter()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
            max_per_host: cfg.max_connections_per_host,
            idle: cfg.connection_idle.get(),
        }
    }

    /// The rule (name and settings) a delivery to `domain` through
    /// `host` falls under, if any: one naming the domain, else one whose
    /// `mx` patterns match the host.
    pub fn rule(&self, domain: &str, host: &str) -> Option<(&str, &Shape)> {
        let by_domain = || {
            self.rules
                .iter()
                .find(|(_, s)| s.domains.iter().any(|p| name_matches(p, domain)))
        };
        let by_mx = || {
            self.rules
                .iter()
                .find(|(_, s)| s.mx.iter().any(|p| name_matches(p, host)))
        };
        by_domain()
            .or_else(by_mx)
            .map(|(name, s)| (name.as_str(), s))
    }

    /// The destination of a delivery to `domain` through `host`.
    pub fn dest(&self, domain: &str, host: &str) -> Dest {
        match self.rule(domain, host) {
            Some((name, s)) => Dest {
                budget: format!("site:{name}"),
                site: Some(name.to_string()),
                max_connections: s.max_connections,
                max_messages_per_connection: s.max_messages_per_connection,
                message_rate: s.message_rate,
                connection_rate: s.connection_rate,
                tls: s.tls,
                idle: s.connection_idle.map_or(self.idle, |d| d.get()),
                backoff: s.backoff.get(),
            },
            None => Dest {
                budget: host.to_ascii_lowercase(),
                site: None,
                max_connections: self.max_per_host,
                max_messages_per_connection: 0,
                message_rate: Rate::per(0, 1),
                connection_rate: Rate::per(0, 1),
                tls: None,
                idle: self.idle,
                backoff: DEFAULT_BACKOFF,
            },
        }
    }
}

/// Whether the destination said to slow down: a `421` (RFC 5321: service
/// not available, closing), or a temporary failure classed
/// `rate_limited` ("450 4.7.1 too much mail", "421 too many
/// connections"), but not `4.5.3` "too many recipients", which asks for
/// another transaction, not a pause.
pub fn slows_down(o: &Outcome) -> bool {
    match o {
        Outcome::Temporary(f) => {
            f.smtp_reply
                .as_deref()
                .is_some_and(|r| r.starts_with("421"))
                || (f.class() == "rate_limited" && f.status != "4.5.3")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use correu_runtime::config::Dur;

    fn config() -> DeliveryConfig {
        let mut cfg = DeliveryConfig::default();
        cfg.shaping.insert(
            "google".into(),
            Shape {
                mx: vec!["*.google.com".into()],
                max_connections: 3,
                connection_idle: Some(Dur::secs(30)),
                ..Shape::default()
            },
        );
        cfg.shaping.insert(
            "partner".into(),
            Shape {
                domains: vec!["partner.example".into(), "*.partner.example".into()],
                max_messages_per_connection: 5,
                tls: Some(OutboundTls::Required),
                ..Shape::default()
            },
        );
        cfg
    }

    #[test]
    fn a_site_groups_mx_hosts_and_a_domain_rule_wins() {
        let s = Shaping::new(&config());
        let a = s.dest("gmail.com", "gmail-smtp-in.l.google.com");
        let b = s.dest("example.org", "ASPMX.L.GOOGLE.COM.");
        assert_eq!(a.budget, "site:google");
        assert_eq!(a, b, "every *.google.com host shares one budget");
        assert_eq!((a.max_connections, a.idle), (3, Duration::from_secs(30)));
        // The domain's rule, though its MX is Google's.
        let p = s.dest("eu.partner.example", "aspmx.l.google.com");
        assert_eq!(p.budget, "site:partner");
        assert_eq!(p.tls, Some(OutboundTls::Required));
        assert_eq!(p.max_messages_per_connection, 5);
        // No rule: the host under the global settings.
        let o = s.dest("example.net", "Mx.Example.NET");
        assert_eq!(o.budget, "mx.example.net");
        assert_eq!((o.max_connections, o.site), (10, None));
        // `*.google.com` is not google.com itself, nor evilgoogle.com.
        assert_eq!(s.dest("x", "google.com").site, None);
        assert_eq!(s.dest("x", "mx.evilgoogle.com").site, None);
    }

    #[test]
    fn a_421_or_a_rate_limit_text_says_slow_down() {
        let reply = |r: &str, status: &str| {
            Outcome::Temporary(crate::outcome::Failure {
                status: status.into(),
                text: r.into(),
                remote_mta: Some("mx".into()),
                smtp_reply: Some(r.into()),
                suppressed: false,
            })
        };
        assert!(slows_down(&reply(
            "421 4.7.0 Try again later, closing connection.",
            "4.7.0"
        )));
        assert!(slows_down(&reply(
            "450 4.7.0 too many messages, slow down",
            "4.7.0"
        )));
        assert!(!slows_down(&reply(
            "452 4.5.3 Too many recipients",
            "4.5.3"
        )));
        // A greylister's or a flaky server's words are not a rate limit.
        assert!(!slows_down(&reply("451 4.3.0 Try again later", "4.3.0")));
        assert!(!slows_down(&reply(
            "451 4.3.0 Temporary lookup failure",
            "4.3.0"
        )));
        assert!(!slows_down(&reply("550 5.1.1 unknown", "5.1.1")));
    }
}
