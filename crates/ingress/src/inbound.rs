//! Inbound verification on the MX port: SPF for MAIL FROM and HELO
//! (RFC 7208), DKIM (RFC 6376), ARC (RFC 8617) and DMARC (RFC 7489 and
//! its revision's DNS tree walk), all through `mail-auth` and the
//! process's one caching resolver; the verdict written as
//! `Authentication-Results` (RFC 8601); and the policy that decides what
//! happens to the message ([`decide`], pure).
//!
//! Authenticated submission and trusted networks are not verified. A
//! message is never dropped here: it is refused with a reply the client
//! sees, put in the Junk folder, or accepted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use correu_runtime::config::{DmarcAction, InboundConfig, InboundPolicy, SpfFailAction};
use correu_runtime::keys::SigningKey;
use correu_smtp::{Enhanced, Reply};
use mail_auth::arc::ArcSealer;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};
use opentelemetry::KeyValue;

/// What verification needs of the session.
pub struct Input<'a> {
    pub client: IpAddr,
    pub helo: &'a str,
    /// The reverse-path without brackets; empty for the null sender.
    pub mail_from: &'a str,
    /// The recipients' domains (their policies apply).
    pub recipient_domains: Vec<&'a str>,
    /// The domain of an alias that forwards the message to another
    /// domain: its key seals the verdict with ARC (RFC 8617).
    pub seal_as: Option<&'a str>,
}

/// What happens to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Stored in each local recipient's Junk folder.
    Quarantine,
    Reject(Reply),
}

/// DMARC's verdict, as [`decide`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmarc {
    /// `pass`, `fail`, `temperror`, `permerror` or `none` (no record, or
    /// no single author domain).
    pub result: &'static str,
    /// The author (RFC5322.From) domain.
    pub domain: String,
    /// The policy the domain asks for (after `t=y` testing mode).
    pub policy: Policy,
}

/// The outcome: the header field to add, and the action.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `Authentication-Results: …\r\n`.
    pub header: String,
    pub action: Action,
    /// Why, for logs and the `reason` label: `pass`, `dmarc`, `spf`,
    /// `none`.
    pub reason: &'static str,
    /// The results by method, for the log line.
    pub results: Vec<(&'static str, &'static str)>,
    /// The domains SPF (MAIL FROM) or DKIM passed for.
    pub passed: Vec<String>,
    /// `ARC-Seal`, `ARC-Message-Signature` and `ARC-Authentication-Results`
    /// for a forwarded message, when its alias's domain has a key.
    pub arc_set: Option<String>,
}

/// What seals for one domain: its DKIM key (as PEM, parsed for each
/// seal, since a sealer names its header fields once and forwarding is
/// rare) and selector.
struct Sealer {
    pem: Vec<u8>,
    algorithm: correu_runtime::config::DkimAlgorithm,
    selector: String,
}

impl Sealer {
    /// The ARC set for `msg`, signing the [`ARC_SIGNED`] fields it has
    /// (a field signed while absent could not be added downstream).
    fn seal(
        &self,
        domain: &str,
        msg: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        arc: &mail_auth::ArcOutput<'_>,
    ) -> anyhow::Result<String> {
        let present: Vec<&str> = ARC_SIGNED
            .iter()
            .copied()
            .filter(|name| {
                msg.headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            })
            .collect();
        Ok(
            match correu_runtime::keys::from_pem(&self.pem, self.algorithm)? {
                SigningKey::Rsa(key) => ArcSealer::from_key(key)
                    .domain(domain)
                    .selector(&self.selector)
                    .headers(present)
                    .seal(msg, results, arc)?
                    .to_header(),
                SigningKey::Ed25519(key) => ArcSealer::from_key(key)
                    .domain(domain)
                    .selector(&self.selector)
                    .headers(present)
                    .seal(msg, results, arc)?
                    .to_header(),
            },
        )
    }
}

/// Header fields the ARC-Message-Signature covers, when present.
pub const ARC_SIGNED: [&str; 10] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
    "DKIM-Signature",
];

pub struct Verifier {
    auth: MessageAuthenticator,
    /// By domain: the keys of `delivery.dkim`.
    sealers: HashMap<String, Sealer>,
    authserv_id: String,
    hostname: String,
    timeout: Duration,
    cfg: InboundConfig,
}

impl Verifier {
    pub fn new(cfg: &correu_runtime::config::Config) -> anyhow::Result<Self> {
        let mut sealers = HashMap::new();
        for (domain, k) in &cfg.delivery.dkim {
            // Read at start, before the runtime serves anything. Signing is
            // delivery's job: a key this ingress cannot read turns its
            // seals off, said once, and mail is still taken.
            #[allow(clippy::disallowed_methods)]
            let read = std::fs::read(&k.key_file).map_err(anyhow::Error::from);
            let pem = match read
                .and_then(|pem| correu_runtime::keys::from_pem(&pem, k.algorithm).map(|_| pem))
            {
                Ok(pem) => pem,
                Err(e) => {
                    tracing::warn!(key = %format!("delivery.dkim.{domain}.key_file"), file = %k.key_file.display(), error = %e,
                        "cannot use this DKIM key: mail forwarded for this domain is not sealed with ARC");
                    continue;
                }
            };
            sealers.insert(
                domain.to_lowercase(),
                Sealer {
                    pem,
                    algorithm: k.algorithm,
                    selector: k.selector.clone(),
                },
            );
        }
        Ok(Verifier {
            sealers,
            auth: MessageAuthenticator(correu_runtime::dns::resolver(&cfg.dns)?),
            authserv_id: cfg
                .inbound
                .authserv_id
                .clone()
                .unwrap_or_else(|| cfg.hostname.clone()),
            hostname: cfg.hostname.clone(),
            timeout: cfg.inbound.timeout.get(),
            cfg: cfg.inbound.clone(),
        })
    }

    /// The name this server writes `Authentication-Results` under.
    pub fn authserv_id(&self) -> &str {
        &self.authserv_id
    }

    /// Verifies `message` (as received, before any field is added) and
    /// decides. Counted in metrics; the caller logs it with the queue id.
    pub async fn verify(&self, input: &Input<'_>, message: &[u8]) -> Verdict {
        let policy = self.cfg.policy_for(input.recipient_domains.iter().copied());
        let verdict = match tokio::time::timeout(self.timeout, self.run(input, message)).await {
            Ok(v) => v,
            Err(_) => self.timed_out(input),
        };
        let (action, reason) = decide(policy, verdict.spf_mail_from, &verdict.dmarc);
        let m = &crate::metrics::METRICS;
        for (method, result) in &verdict.results {
            m.auth_results.add(
                1,
                &[
                    KeyValue::new("method", *method),
                    KeyValue::new("result", *result),
                ],
            );
        }
        m.auth_actions.add(
            1,
            &[
                KeyValue::new("action", action_label(&action)),
                KeyValue::new("reason", reason),
            ],
        );
        Verdict {
            header: verdict.header,
            action,
            reason,
            results: verdict.results,
            passed: verdict.passed,
            arc_set: verdict.arc_set,
        }
    }

    async fn run(&self, input: &Input<'_>, message: &[u8]) -> Checked {
        let ip = input.client;
        let helo = input.helo;
        let host = self.hostname.as_str();
        let spf_helo = self
            .auth
            .verify_spf(SpfParameters::verify_ehlo(ip, helo, host));
        let spf_from = self.auth.verify_spf(SpfParameters::verify_mail_from(
            ip,
            helo,
            host,
            input.mail_from,
        ));
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            // Not a message mail-auth can read: SPF only.
            let (spf_helo, spf_from) = tokio::join!(spf_helo, spf_from);
            let ar = AuthenticationResults::new(&self.authserv_id)
                .with_spf_ehlo_result(&spf_helo, ip, helo)
                .with_spf_mailfrom_result(&spf_from, ip, input.mail_from, helo);
            let dmarc = Dmarc {
                result: "none",
                domain: String::new(),
                policy: Policy::Unspecified,
            };
            return Checked {
                arc_set: None,
                header: format!("Authentication-Results: {ar}\r\n"),
                passed: spf_passed(&spf_from, input, helo),
                spf_mail_from: spf_from.result(),
                results: vec![
                    ("spf.helo", spf_label(spf_helo.result())),
                    ("spf.mailfrom", spf_label(spf_from.result())),
                ],
                dmarc,
            };
        };
        let (spf_helo, spf_from, dkim, arc) = tokio::join!(
            spf_helo,
            spf_from,
            self.auth.verify_dkim(&msg),
            self.auth.verify_arc(&msg)
        );
        // DMARC's SPF identity: MAIL FROM's domain, or HELO's for the null
        // sender (RFC 7489 §3.1.1 with RFC 7208 §2.4).
        let from_domain = match input.mail_from.rsplit_once('@') {
            Some((_, d)) => d,
            None => helo,
        };
        let dmarc_out = self
            .auth
            .verify_dmarc(mail_auth::dmarc::verify::DmarcParameters::new(
                &msg,
                &dkim,
                from_domain,
                &spf_from,
            ))
            .await;
        let dmarc = Dmarc {
            result: dmarc_label(
                dmarc_out.dmarc_record().is_some(),
                dmarc_out.spf_result(),
                dmarc_out.dkim_result(),
            ),
            domain: dmarc_out.domain().to_string(),
            policy: dmarc_out.policy(),
        };
        let header_from = msg.from();
        let ar = AuthenticationResults::new(&self.authserv_id)
            .with_dkim_results(&dkim, header_from)
            .with_spf_ehlo_result(&spf_helo, ip, helo)
            .with_spf_mailfrom_result(&spf_from, ip, input.mail_from, helo)
            .with_arc_result(&arc, ip);
        let mut header = format!("Authentication-Results: {ar}");
        if dkim.is_empty() {
            // mail-auth writes nothing for an unsigned message; RFC 8601
            // says so with `none`.
            header.push_str(";\r\n\tdkim=none");
        }
        // DMARC in our own words: mail-auth says `none` when a domain has
        // a record but neither SPF nor DKIM passed, which is a fail.
        if !dmarc.domain.is_empty() {
            header.push_str(&format!(
                ";\r\n\tdmarc={} header.from={} policy.dmarc={}",
                dmarc.result,
                pvalue(&dmarc.domain),
                policy_word(dmarc.policy)
            ));
        } else {
            header.push_str(";\r\n\tdmarc=none");
        }
        header.push_str("\r\n");
        let mut results = vec![
            ("spf.helo", spf_label(spf_helo.result())),
            ("spf.mailfrom", spf_label(spf_from.result())),
            ("arc", dkim_label(arc.result())),
            ("dmarc", dmarc.result),
        ];
        if dkim.is_empty() {
            results.push(("dkim", "none"));
        }
        for d in &dkim {
            results.push(("dkim", dkim_label(d.result())));
        }
        let mut passed = spf_passed(&spf_from, input, helo);
        passed.extend(
            dkim.iter()
                .filter(|d| *d.result() == DkimResult::Pass)
                .filter_map(|d| d.signature().map(|s| s.d.clone())),
        );
        // A message an alias forwards is sealed: the next hop can trust
        // what we found (RFC 8617 §5.1), unless the chain it came with
        // failed already.
        let arc_set = match input.seal_as.and_then(|d| Some((d, self.sealers.get(d)?))) {
            Some((domain, sealer)) if arc.can_be_sealed() => {
                let results = AuthenticationResults::new(&self.authserv_id)
                    .with_dkim_results(&dkim, header_from)
                    .with_spf_mailfrom_result(&spf_from, ip, input.mail_from, helo)
                    .with_arc_result(&arc, ip)
                    .with_dmarc_result(&dmarc_out);
                match sealer.seal(domain, &msg, &results, &arc) {
                    Ok(set) => Some(set),
                    Err(e) => {
                        tracing::warn!(error = %e, "ARC sealing failed; forwarded without a seal");
                        None
                    }
                }
            }
            Some(_) => {
                tracing::info!("the message's ARC chain failed: forwarded without a seal");
                None
            }
            None => None,
        };
        Checked {
            header,
            passed,
            spf_mail_from: spf_from.result(),
            results,
            dmarc,
            arc_set,
        }
    }

    fn timed_out(&self, input: &Input<'_>) -> Checked {
        tracing::warn!(client = %input.client, timeout = ?self.timeout, "inbound verification timed out: temperror");
        let why = "(verification timed out)";
        Checked {
            arc_set: None,
            passed: Vec::new(),
            header: format!(
                "Authentication-Results: {};\r\n\tspf=temperror {why} smtp.mailfrom={};\r\n\tdkim=temperror {why};\r\n\tdmarc=temperror {why}\r\n",
                self.authserv_id,
                if input.mail_from.is_empty() {
                    "<>".to_string()
                } else {
                    pvalue(input.mail_from)
                }
            ),
            spf_mail_from: SpfResult::TempError,
            results: vec![
                ("spf.mailfrom", "temperror"),
                ("dkim", "temperror"),
                ("dmarc", "temperror"),
            ],
            dmarc: Dmarc {
                result: "temperror",
                domain: String::new(),
                policy: Policy::Unspecified,
            },
        }
    }
}

/// What the checks found, before policy.
struct Checked {
    arc_set: Option<String>,
    header: String,
    passed: Vec<String>,
    spf_mail_from: SpfResult,
    results: Vec<(&'static str, &'static str)>,
    dmarc: Dmarc,
}

/// The MAIL FROM domain (HELO's for the null sender) when SPF passed.
fn spf_passed(spf: &mail_auth::SpfOutput, input: &Input<'_>, helo: &str) -> Vec<String> {
    if spf.result() != SpfResult::Pass {
        return Vec::new();
    }
    let domain = input.mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
    vec![domain.to_string()]
}

/// The policy's decision, and its reason. DMARC first: a domain that
/// asks for rejection or quarantine of mail failing DMARC gets it when
/// enforced. Then an SPF `fail` for MAIL FROM, when refused. Errors
/// (`temperror`, `permerror`) never refuse: the domain's DNS being down
/// is no proof of forgery, and the mail is marked in
/// `Authentication-Results` for the reader instead.
pub fn decide(
    policy: InboundPolicy,
    spf_mail_from: SpfResult,
    dmarc: &Dmarc,
) -> (Action, &'static str) {
    if dmarc.result == "fail" && policy.dmarc == DmarcAction::Enforce {
        match dmarc.policy {
            Policy::Reject => {
                let text = format!(
                    "Error: DMARC policy of {} refuses this message (the author's domain did not authenticate it)",
                    safe_domain(&dmarc.domain)
                );
                return (
                    Action::Reject(Reply::new(550, Enhanced(5, 7, 1), text)),
                    "dmarc",
                );
            }
            Policy::Quarantine => return (Action::Quarantine, "dmarc"),
            Policy::None | Policy::Unspecified => {}
        }
    }
    if spf_mail_from == SpfResult::Fail && policy.spf_fail == SpfFailAction::Reject {
        // RFC 7372 §3.2: 5.7.23, SPF validation failed.
        return (
            Action::Reject(Reply::new(
                550,
                Enhanced(5, 7, 23),
                "Error: SPF of the sender's domain does not allow this client to send its mail",
            )),
            "spf",
        );
    }
    let reason = if dmarc.result == "pass" {
        "pass"
    } else {
        "none"
    };
    (Action::Accept, reason)
}

pub fn action_label(a: &Action) -> &'static str {
    match a {
        Action::Accept => "accept",
        Action::Quarantine => "quarantine",
        Action::Reject(_) => "reject",
    }
}

fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Fail(_) => "fail",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::TempError(_) => "temperror",
        DkimResult::PermError(_) => "permerror",
        DkimResult::None => "none",
    }
}

/// DMARC's result (RFC 7489 §11.2): `pass` when an aligned SPF or DKIM
/// passed; an error when one kept it from being known; `fail` when the
/// domain has a record and nothing aligned passed; `none` without one.
fn dmarc_label(has_record: bool, spf: &DmarcResult, dkim: &DmarcResult) -> &'static str {
    if *spf == DmarcResult::Pass || *dkim == DmarcResult::Pass {
        "pass"
    } else if matches!(spf, DmarcResult::TempError(_)) || matches!(dkim, DmarcResult::TempError(_))
    {
        "temperror"
    } else if matches!(spf, DmarcResult::PermError(_)) || matches!(dkim, DmarcResult::PermError(_))
    {
        "permerror"
    } else if has_record {
        "fail"
    } else {
        "none"
    }
}

fn policy_word(p: Policy) -> &'static str {
    match p {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

/// A domain as reply text may carry it: letters, digits, dots and hyphens.
fn safe_domain(d: &str) -> String {
    d.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(253)
        .collect()
}

/// A value for a property of `Authentication-Results` (RFC 8601 §2.2):
/// as it is when it is a plain token, else quoted; controls never pass.
fn pvalue(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._@+".contains(c));
    if plain {
        v.to_string()
    } else {
        let inner: String = correu_smtp::headers::field_value(v)
            .chars()
            .filter(|c| *c != '"' && *c != '\\')
            .collect();
        format!("\"{inner}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dmarc(result: &'static str, policy: Policy) -> Dmarc {
        Dmarc {
            result,
            domain: "bank.test".into(),
            policy,
        }
    }

    const ENFORCE: InboundPolicy = InboundPolicy {
        dmarc: DmarcAction::Enforce,
        spf_fail: SpfFailAction::Accept,
    };
    const MONITOR: InboundPolicy = InboundPolicy {
        dmarc: DmarcAction::Monitor,
        spf_fail: SpfFailAction::Accept,
    };
    const SPF_REJECT: InboundPolicy = InboundPolicy {
        dmarc: DmarcAction::Enforce,
        spf_fail: SpfFailAction::Reject,
    };

    fn code(a: &Action) -> Option<(u16, String)> {
        match a {
            Action::Reject(r) => Some((r.code, r.to_string())),
            _ => None,
        }
    }

    #[test]
    fn policy_table() {
        use Policy::*;
        use SpfResult as S;
        // (policy, SPF for MAIL FROM, DMARC result, DMARC policy) -> (action, reason)
        let table: &[(InboundPolicy, SpfResult, &str, Policy, &str, &str)] = &[
            (ENFORCE, S::Pass, "pass", Reject, "accept", "pass"),
            (ENFORCE, S::Fail, "fail", Reject, "reject", "dmarc"),
            (ENFORCE, S::Fail, "fail", Quarantine, "quarantine", "dmarc"),
            (ENFORCE, S::Fail, "fail", None, "accept", "none"),
            (ENFORCE, S::Fail, "none", Unspecified, "accept", "none"),
            // Errors never refuse.
            (ENFORCE, S::TempError, "temperror", Reject, "accept", "none"),
            (ENFORCE, S::PermError, "permerror", Reject, "accept", "none"),
            // Monitoring records only.
            (MONITOR, S::Fail, "fail", Reject, "accept", "none"),
            (MONITOR, S::Fail, "fail", Quarantine, "accept", "none"),
            // SPF fail refused only when asked, and only a real fail.
            (SPF_REJECT, S::Fail, "none", Unspecified, "reject", "spf"),
            (
                SPF_REJECT,
                S::SoftFail,
                "none",
                Unspecified,
                "accept",
                "none",
            ),
            (
                SPF_REJECT,
                S::TempError,
                "none",
                Unspecified,
                "accept",
                "none",
            ),
            (SPF_REJECT, S::Fail, "pass", Reject, "reject", "spf"),
            // DMARC decides first.
            (
                SPF_REJECT,
                S::Fail,
                "fail",
                Quarantine,
                "quarantine",
                "dmarc",
            ),
        ];
        for (i, (p, spf, result, pol, action, reason)) in table.iter().enumerate() {
            let (a, r) = decide(*p, *spf, &dmarc(result, *pol));
            assert_eq!(
                (action_label(&a), r),
                (*action, *reason),
                "row {i}: {p:?} {spf:?} {result} {pol:?}"
            );
        }
    }

    #[test]
    fn refusals_name_the_rule_with_its_enhanced_code() {
        let (a, _) = decide(ENFORCE, SpfResult::Fail, &dmarc("fail", Policy::Reject));
        let (c, text) = code(&a).unwrap();
        assert_eq!(c, 550);
        assert!(
            text.starts_with("550 5.7.1 ") && text.contains("DMARC policy of bank.test"),
            "{text}"
        );
        let (a, _) = decide(
            SPF_REJECT,
            SpfResult::Fail,
            &dmarc("none", Policy::Unspecified),
        );
        let (_, text) = code(&a).unwrap();
        assert!(text.starts_with("550 5.7.23 "), "{text}");
        // A hostile From: domain cannot reach the reply as it is.
        let mut d = dmarc("fail", Policy::Reject);
        d.domain = "evil\r\n250 ok.test".into();
        let (a, _) = decide(ENFORCE, SpfResult::None, &d);
        let (_, text) = code(&a).unwrap();
        assert!(
            !text.trim_end().contains('\n') && text.contains("evil250ok.test"),
            "{text:?}"
        );
    }

    #[test]
    fn dmarc_results_say_fail_when_a_record_found_nothing_aligned() {
        use mail_auth::Error;
        assert_eq!(
            dmarc_label(true, &DmarcResult::None, &DmarcResult::None),
            "fail"
        );
        assert_eq!(
            dmarc_label(false, &DmarcResult::None, &DmarcResult::None),
            "none"
        );
        assert_eq!(
            dmarc_label(
                true,
                &DmarcResult::Fail(Error::NotAligned),
                &DmarcResult::Pass
            ),
            "pass"
        );
        assert_eq!(
            dmarc_label(
                true,
                &DmarcResult::TempError(Error::Io("x".into())),
                &DmarcResult::None
            ),
            "temperror"
        );
    }

    #[test]
    fn property_values_are_tokens_or_quoted() {
        assert_eq!(pvalue("jo@bank.test"), "jo@bank.test");
        assert_eq!(pvalue("a b"), "\"a b\"");
        assert_eq!(pvalue("x\r\ny\"z"), "\"x??yz\"");
    }
}
