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
