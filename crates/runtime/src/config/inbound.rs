//! `[inbound]`: what ingress checks about mail from the internet on the MX
//! port: SPF, DKIM, ARC and DMARC, written into `Authentication-Results`,
//! and what it does about a domain's DMARC policy and an SPF fail.
//! Authenticated submission and trusted networks are not checked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Check;
use super::values::{Dur, is_domain};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct InboundConfig {
    /// Verify SPF (MAIL FROM and HELO), DKIM, ARC and DMARC, and add
    /// `Authentication-Results` (RFC 8601).
    pub verify: bool,
    /// The longest verification of one message may take, its DNS lookups
    /// together; past it every method is `temperror` and the message is
    /// accepted.
    pub timeout: Dur,
    /// The name in `Authentication-Results`; unset: `hostname`. Such
    /// fields arriving with a message under this name are removed.
    pub authserv_id: Option<String>,
    /// For mail to every local domain unless `domains` says otherwise:
    /// see [`InboundPolicy::dmarc`].
    pub dmarc: DmarcAction,
    /// Likewise: see [`InboundPolicy::spf_fail`].
    pub spf_fail: SpfFailAction,
    /// The policy for mail to one local domain.
    pub domains: BTreeMap<String, InboundPolicy>,
    /// DNS blocklists: of client addresses (DNSBL, asked at connect) and
    /// of sender and HELO domains (RHSBL, asked when the message is in).
    pub blocklists: Vec<Blocklist>,
    /// A client or message is refused (`554 5.7.1`) when the weights of
    /// the lists naming it add up to this.
    pub blocklist_threshold: f64,
    pub greylist: GreylistConfig,
    /// Milters (the Sendmail/Postfix mail filter protocol: rspamd,
    /// OpenDKIM, OpenDMARC), asked in order once a message is in.
    pub milters: Vec<Milter>,
}

/// One milter.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Milter {
    /// A name for logs and metrics.
    pub name: String,
    /// `host:port`, or `unix:/path/to/socket`.
    pub address: String,
    /// Connecting, and each reply.
    #[serde(default = "milter_timeout")]
    pub timeout: Dur,
    /// When the milter cannot be reached or does not answer: `tempfail`
    /// (`451 4.7.1`) or `accept` (as if it were not configured).
    #[serde(default)]
    pub default_action: MilterDefault,
    /// The listeners whose mail it sees: `mx`, `submission`,
    /// `submissions`.
    #[serde(default = "mx_only")]
    pub ports: Vec<String>,
}

fn milter_timeout() -> Dur {
    Dur::secs(30)
}

fn mx_only() -> Vec<String> {
    vec!["mx".to_string()]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MilterDefault {
    #[default]
    Tempfail,
    Accept,
}

/// One DNS blocklist zone.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Blocklist {
    /// The zone, as `zen.spamhaus.org` or `dbl.example.net`.
    pub zone: String,
    /// `ip`: the client's address, reversed (`4.3.2.1.zone`); `domain`:
    /// the MAIL FROM and HELO domains (`example.com.zone`).
    #[serde(default)]
    pub kind: BlocklistKind,
    /// Added to the score when the list names the client or a domain.
    #[serde(default = "one")]
    pub weight: f64,
    /// Answers that count as listed; empty: any in 127.0.0.0/8 except
    /// 127.255.255.0/24, which lists use to say a query was refused.
    #[serde(default)]
    pub codes: Vec<std::net::Ipv4Addr>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlocklistKind {
    #[default]
    Ip,
    Domain,
}

/// Greylisting (RFC 6647): the first message of a (client network,
/// sender, recipient) triplet is deferred with `451 4.7.1`; a retry after
/// `delay` passes, and the triplet is let through for `pass_for`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct GreylistConfig {
    pub enabled: bool,
    /// How long a new triplet waits (Postgrey: 5 minutes).
    pub delay: Dur,
    /// A triplet never retried is forgotten after this.
    pub expire: Dur,
    /// A triplet that passed is let through without waiting for this long
    /// (renewed by each message).
    pub pass_for: Dur,
    /// Senders whose domain is one of these (or under one) skip it when
    /// SPF or DKIM passes for that domain.
    pub skip_domains: Vec<String>,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: false,
            delay: Dur::secs(300),
            expire: Dur::secs(86_400),
            pass_for: Dur::secs(35 * 86_400),
            skip_domains: Vec::new(),
        }
    }
}

/// What to do with what verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct InboundPolicy {
    /// `enforce`: a DMARC `p=reject` failure is refused (`550 5.7.1`) and a
    /// `p=quarantine` failure goes to the mailbox's Junk folder;
    /// `monitor`: recorded in `Authentication-Results` only.
    pub dmarc: DmarcAction,
    /// `reject`: an SPF `fail` for MAIL FROM (the domain's `-all`) is
    /// refused (`550 5.7.23`); `accept`: recorded only.
    pub spf_fail: SpfFailAction,
}

impl Default for InboundPolicy {
    fn default() -> Self {
        InboundPolicy {
            dmarc: DmarcAction::Enforce,
            spf_fail: SpfFailAction::Accept,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcAction {
    Monitor,
    Enforce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfFailAction {
    Accept,
    Reject,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            verify: true,
            timeout: Dur::secs(15),
            authserv_id: None,
            dmarc: DmarcAction::Enforce,
            spf_fail: SpfFailAction::Accept,
            domains: BTreeMap::new(),
            blocklists: Vec::new(),
            blocklist_threshold: 1.0,
            greylist: GreylistConfig::default(),
            milters: Vec::new(),
        }
    }
}

impl InboundConfig {
    /// The policy for every local domain without one of its own.
    pub fn policy(&self) -> InboundPolicy {
        InboundPolicy {
            dmarc: self.dmarc,
            spf_fail: self.spf_fail,
        }
    }

    /// The policy for a message to these recipients' domains: the
    /// strictest of theirs, since one reply answers for the whole message.
    pub fn policy_for<'a>(&self, domains: impl IntoIterator<Item = &'a str>) -> InboundPolicy {
        let mut strictest: Option<InboundPolicy> = None;
        for d in domains {
            let p = self
                .domains
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(d))
                .map_or(self.policy(), |(_, p)| *p);
            strictest = Some(match strictest {
                None => p,
                Some(s) => InboundPolicy {
                    dmarc: s.dmarc.max(p.dmarc),
                    spf_fail: s.spf_fail.max(p.spf_fail),
                },
            });
        }
        strictest.unwrap_or(self.policy())
    }

    pub(crate) fn validate(&self, hostname: &str, local: &[String], c: &mut Check) {
        if !c.role.runs_ingress() {
            return;
        }
        if self.timeout.get().is_zero() {
            c.err("inbound.timeout", "must be more than 0s");
        }
        if let Some(id) = &self.authserv_id
            && !is_domain(id)
        {
            c.err(
                "inbound.authserv_id",
                format!("`{id}` is not a host name (hostname `{hostname}` is used when unset)"),
            );
        }
        for (i, b) in self.blocklists.iter().enumerate() {
            if !is_domain(&b.zone) {
                c.err(
                    format!("inbound.blocklists[{i}].zone"),
                    format!("`{}` is not a DNS zone", b.zone),
                );
            }
            if !(b.weight.is_finite() && b.weight >= 0.0) {
                c.err(
                    format!("inbound.blocklists[{i}].weight"),
                    "must be a number of 0 or more",
                );
            }
        }
        if !(self.blocklist_threshold.is_finite() && self.blocklist_threshold > 0.0) {
            c.err("inbound.blocklist_threshold", "must be more than 0");
        }
        for (i, m) in self.milters.iter().enumerate() {
            let at = |k: &str| format!("inbound.milters[{i}].{k}");
            if m.name.is_empty() {
                c.err(at("name"), "must not be empty");
            }
            match m.address.strip_prefix("unix:") {
                Some(path) if path.starts_with('/') => {}
                Some(_) => c.err(at("address"), "unix: needs an absolute path"),
                None if super::values::split_host_port(&m.address).is_none() => c.err(
                    at("address"),
                    format!("`{}` is neither host:port nor unix:/path", m.address),
                ),
                None => {}
            }
            if m.timeout.get().is_zero() {
                c.err(at("timeout"), "must be more than 0s");
            }
            for (j, p) in m.ports.iter().enumerate() {
                if !matches!(p.as_str(), "mx" | "submission" | "submissions") {
                    c.err(
                        format!("inbound.milters[{i}].ports[{j}]"),
                        format!("`{p}` is not mx, submission or submissions"),
                    );
                }
            }
        }
        let g = &self.greylist;
        if g.enabled && g.delay.get() >= g.expire.get() {
            c.err(
                "inbound.greylist.delay",
                "must be shorter than inbound.greylist.expire, or no retry could pass",
            );
        }
        for (i, d) in g.skip_domains.iter().enumerate() {
            if !is_domain(d) {
                c.err(
                    format!("inbound.greylist.skip_domains[{i}]"),
                    format!("`{d}` is not a domain"),
                );
            }
        }
        for d in self.domains.keys() {
            if !local.iter().any(|l| l.eq_ignore_ascii_case(d)) {
                c.err(
                    format!("inbound.domains.\"{d}\""),
                    "not one of `domains`: a policy applies to mail for a local domain",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strictest_policy_of_the_recipients_domains_applies() {
        let mut c = InboundConfig {
            dmarc: DmarcAction::Monitor,
            ..InboundConfig::default()
        };
        c.domains.insert(
            "strict.test".into(),
            InboundPolicy {
                dmarc: DmarcAction::Enforce,
                spf_fail: SpfFailAction::Reject,
            },
        );
        assert_eq!(c.policy_for(["lax.test"]), c.policy());
        assert_eq!(
            c.policy_for(["lax.test", "STRICT.test"]),
            InboundPolicy {
                dmarc: DmarcAction::Enforce,
                spf_fail: SpfFailAction::Reject
            }
        );
        assert_eq!(c.policy_for([]), c.policy());
    }
}
