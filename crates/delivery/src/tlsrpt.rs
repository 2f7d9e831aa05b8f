//! TLS reporting (RFC 8460): what happened to TLS in each session with a
//! remote domain's MX hosts, counted per UTC day and policy, and the day's
//! aggregate report sent to every domain that publishes `_smtp._tls`
//! (`v=TLSRPTv1; rua=mailto:...,https://...`).
//!
//! Counts live in Redis (`<prefix>:tlsrpt:<day>:<domain>`, a hash of
//! counters, and `<prefix>:tlsrpt:<day>`, the set of domains), so every
//! delivery process adds to one report; `correu serve` without Redis
//! counts in its process. After midnight UTC one process (the first to
//! set `<prefix>:tlsrpt:sent:<day>`) sends yesterday's reports; `correu
//! tls-report send` sends a day's at once.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use correu_proto::v1::{QueuedMessage, Recipient};
use correu_queue::Queue;
use correu_runtime::Config;
use correu_runtime::redis::{Keyed, RedisError};
use deadpool_redis::Pool;
use deadpool_redis::redis::AsyncCommands;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use tokio_rustls::TlsConnector;

use crate::mta_sts;

/// How long a day's counts are kept (it is reported the next day).
const KEEP: Duration = Duration::from_secs(4 * 86_400);

/// One session's TLS, as a report counts it.
pub struct Session<'a> {
    /// The policy domain: the recipient domain.
    pub domain: &'a str,
    /// Its MTA-STS policy, when one applied (`sts`; else `no-policy-found`).
    pub policy: Option<&'a mta_sts::Policy>,
    /// The MX host's TLSA records, when DANE applied (`tlsa`; it wins
    /// over MTA-STS, RFC 8461 §2).
    pub tlsa: Option<&'a [String]>,
    pub mx: &'a str,
    pub ip: IpAddr,
    /// `None` when TLS was established; else the RFC 8460 §4.3 result
    /// type (`starttls-not-supported`, `certificate-host-mismatch`, ...).
    pub failure: Option<&'static str>,
}

enum Store {
    Redis(Keyed),
    /// Day → domain → counter → count.
    Local(Mutex<HashMap<String, DayCounts>>),
}

/// A day's counters by domain.
type DayCounts = BTreeMap<String, HashMap<String, u64>>;

/// Counts sessions and sends reports.
pub struct TlsReports {
    store: Store,
    /// Without Redis: the `day:domain` reports this process sent.
    sent: Mutex<std::collections::HashSet<String>>,
    organization: String,
    contact: String,
    hostname: String,
}

/// Today, or the day `days_ago` before, as `YYYY-MM-DD` (UTC).
pub fn day(days_ago: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    correu_smtp::headers::rfc3339(now - days_ago * 86_400)[..10].to_string()
}

/// What RFC 8460 §4.3 calls a session's failure, from Correu's error.
pub fn result_type(error: &crate::client::SessionError) -> Option<&'static str> {
    use crate::client::SessionError as E;
    match error {
        E::TlsRequired(why) if why.contains("does not offer STARTTLS") => {
            Some("starttls-not-supported")
        }
        E::TlsRequired(why) | E::TlsHandshake(why) => {
            let why = why.to_ascii_lowercase();
            Some(if why.contains("dane:") {
                "tlsa-invalid"
            } else if why.contains("notvalidforname") || why.contains("not valid for") {
                "certificate-host-mismatch"
            } else if why.contains("expired") {
                "certificate-expired"
            } else if why.contains("unknownissuer") || why.contains("certificate") {
                "certificate-not-trusted"
            } else {
                "validation-failure"
            })
        }
        _ => None,
    }
}

impl TlsReports {
    /// The reporter when `delivery.tls_reports.enabled` (operators'
    /// commands pass `force`).
    pub fn open(cfg: &Config, redis: Option<Pool>, force: bool) -> Option<TlsReports> {
        let t = &cfg.delivery.tls_reports;
        if !t.enabled && !force {
            return None;
        }
        let store = match redis {
            Some(pool) => Store::Redis(Keyed::new(&cfg.redis, pool)),
            None => Store::Local(Mutex::new(HashMap::new())),
        };
        let or = |v: &str, d: String| if v.is_empty() { d } else { v.to_string() };
        Some(TlsReports {
            store,
            sent: Mutex::new(std::collections::HashSet::new()),
            organization: or(&t.organization, cfg.hostname.clone()),
            contact: or(&t.contact, format!("postmaster@{}", cfg.hostname)),
            hostname: cfg.hostname.clone(),
        })
    }

    /// Counts one session (today). Failing to count never fails a delivery.
    pub async fn record(&self, s: &Session<'_>) {
        let field = counter(s);
        let domain = s.domain.to_ascii_lowercase();
        let today = day(0);
        match &self.store {
            Store::Redis(r) => {
                let (pool, prefix) = (&r.pool, &r.prefix);
                let key = format!("{prefix}:tlsrpt:{today}:{domain}");
                let set = format!("{prefix}:tlsrpt:{today}");
                let work = async {
                    let mut c = pool.get().await?;
                    deadpool_redis::redis::pipe()
                        .hincr(&key, &field, 1)
                        .ignore()
                        .expire(&key, KEEP.as_secs() as i64)
                        .ignore()
                        .sadd(&set, &domain)
                        .ignore()
                        .expire(&set, KEEP.as_secs() as i64)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await?;
                    Ok::<_, RedisError>(())
                };
                match tokio::time::timeout(r.timeout, work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "a TLS report count was lost"),
                    Err(_) => tracing::debug!("a TLS report count was lost: Redis timed out"),
                }
            }
            Store::Local(days) => {
                let mut days = correu_runtime::sync::lock(days);
                days.retain(|d, _| *d >= day(3));
                *days
                    .entry(today)
                    .or_default()
                    .entry(domain)
                    .or_default()
                    .entry(field)
                    .or_insert(0) += 1;
            }
        }
    }

    /// The counts of `day`, by domain.
    async fn counts(&self, day: &str) -> Result<DayCounts, RedisError> {
        match &self.store {
            Store::Redis(Keyed { pool, prefix, .. }) => {
                let mut c = pool.get().await?;
                let domains: Vec<String> = c.smembers(format!("{prefix}:tlsrpt:{day}")).await?;
                let mut out = BTreeMap::new();
                for d in domains {
                    let h: HashMap<String, u64> =
                        c.hgetall(format!("{prefix}:tlsrpt:{day}:{d}")).await?;
                    out.insert(d, h);
                }
                Ok(out)
            }
            Store::Local(days) => Ok(correu_runtime::sync::lock(days)
                .get(day)
                .cloned()
                .unwrap_or_default()),
        }
    }

    /// Every report of `day` (RFC 8460 §4.4 JSON), by domain.
    pub async fn reports(&self, day: &str) -> Result<Vec<(String, serde_json::Value)>, RedisError> {
        Ok(self
            .counts(day)
            .await?
            .into_iter()
            .map(|(domain, counts)| {
                let report = self.report(day, &domain, &counts);
                (domain, report)
            })
            .collect())
    }

    /// The report of `domain` for `day` from its counters.
    fn report(&self, day: &str, domain: &str, counts: &HashMap<String, u64>) -> serde_json::Value {
        // Policy (type, strings, mx) → successes, and failures by
        // (result type, MX, address).
        type Policy = (String, Vec<String>, Vec<String>);
        type Failures = BTreeMap<(String, String, String), u64>;
        let mut policies: BTreeMap<Policy, (u64, Failures)> = BTreeMap::new();
        for (field, n) in counts {
            let Ok(c) = serde_json::from_str::<Counter>(field) else {
                continue;
            };
            let entry = policies
                .entry((c.policy_type, c.policy_string, c.mx_host))
                .or_default();
            match c.result_type {
                None => entry.0 += n,
                Some(r) => *entry.1.entry((r, c.mx, c.ip)).or_insert(0) += n,
            }
        }
        let policies: Vec<serde_json::Value> = policies
            .into_iter()
            .map(|((kind, strings, mx), (ok, failures))| {
                let failed: u64 = failures.values().sum();
                let mut policy = serde_json::json!({
                    "policy-type": kind,
                    "policy-domain": domain,
                });
                if !strings.is_empty() {
                    policy["policy-string"] = strings.into();
                    policy["mx-host"] = mx.into();
                }
                serde_json::json!({
                    "policy": policy,
                    "summary": {
                        "total-successful-session-count": ok,
                        "total-failure-session-count": failed,
                    },
                    "failure-details": failures
                        .into_iter()
                        .map(|((result, mx, ip), n)| serde_json::json!({
                            "result-type": result,
                            "receiving-mx-hostname": mx,
                            "receiving-ip": ip,
                            "failed-session-count": n,
                        }))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "organization-name": self.organization,
            "date-range": {
                "start-datetime": format!("{day}T00:00:00Z"),
                "end-datetime": format!("{day}T23:59:59Z"),
            },
            "contact-info": self.contact,
            "report-id": report_id(day, domain, &self.hostname),
            "policies": policies,
        })
    }

    /// Sends `day`'s reports to the domains that ask for them; one line per
    /// report and address, saying what happened.
    ///
    /// With `claim` (the daily task), a domain is taken by one process of
    /// all that share Redis (`tlsrpt:sent:<day>:<domain>`) and given back
    /// when nothing could be sent, so a later try sends it; without (the
    /// operator's command), every domain is sent.
    pub async fn send(
        &self,
        day: &str,
        queue: &Queue,
        resolver: &TokioResolver,
        https: &TlsConnector,
        claim: bool,
    ) -> Result<Vec<String>, RedisError> {
        let mut said = Vec::new();
        for (domain, report) in self.reports(day).await? {
            if claim && !self.claim(day, &domain).await {
                continue;
            }
            let rua = match rua(resolver, &domain).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    said.push(format!("{domain}: no _smtp._tls record; no report"));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%domain, %day, error = %e, "TLS report: _smtp._tls lookup failed; trying later");
                    said.push(format!("{domain}: _smtp._tls lookup failed: {e}"));
                    if claim {
                        self.unclaim(day, &domain).await;
                    }
                    continue;
                }
            };
            let mut sent = false;
            let json = report.to_string();
            let gz = gzip(json.as_bytes());
            let id = report_id(day, &domain, &self.hostname);
            for uri in rua {
                let result = if let Some(to) = uri.strip_prefix("mailto:") {
                    let to = to.split('?').next().unwrap_or(to);
                    let msg = self.message(day, &domain, &id, to, &gz);
                    queue
                        .publish(&msg)
                        .await
                        .map(|()| format!("queued as {}", msg.queue_id))
                        .map_err(|e| e.to_string())
                } else if uri.starts_with("https://") {
                    match crate::http::Target::parse(&uri) {
                        Ok(t) => crate::http::post(
                            https,
                            &t,
                            &[("Content-Type", "application/tlsrpt+gzip".into())],
                            gz.clone().into(),
                            Duration::from_secs(30),
                        )
                        .await
                        .map(|()| "posted".to_string())
                        .map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                } else {
                    Err("neither mailto: nor https:".to_string())
                };
                let line = match result {
                    Ok(done) => {
                        sent = true;
                        tracing::info!(%domain, %uri, %day, "TLS report sent");
                        format!("{domain}: {uri}: {done}")
                    }
                    Err(e) => {
                        tracing::warn!(%domain, %uri, %day, error = %e, "TLS report not sent");
                        format!("{domain}: {uri}: not sent: {e}")
                    }
                };
                said.push(line);
            }
            if claim && !sent {
                self.unclaim(day, &domain).await;
            }
        }
        Ok(said)
    }

    /// Takes `domain`'s report of `day` for this process; `false` when
    /// another took it (or Redis cannot say: a later try will).
    async fn claim(&self, day: &str, domain: &str) -> bool {
        match &self.store {
            Store::Redis(Keyed { pool, prefix, .. }) => {
                let Ok(mut c) = pool.get().await else {
                    return false;
                };
                let set: Result<Option<String>, _> = deadpool_redis::redis::cmd("SET")
                    .arg(format!("{prefix}:tlsrpt:sent:{day}:{domain}"))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(KEEP.as_secs())
                    .query_async(&mut c)
                    .await;
                matches!(set, Ok(Some(_)))
            }
            Store::Local(_) => {
                correu_runtime::sync::lock(&self.sent).insert(format!("{day}:{domain}"))
            }
        }
    }

    /// Gives `domain`'s report of `day` back, unsent.
    async fn unclaim(&self, day: &str, domain: &str) {
        match &self.store {
            Store::Redis(Keyed { pool, prefix, .. }) => {
                if let Ok(mut c) = pool.get().await {
                    let _: Result<(), _> =
                        c.del(format!("{prefix}:tlsrpt:sent:{day}:{domain}")).await;
                }
            }
            Store::Local(_) => {
                correu_runtime::sync::lock(&self.sent).remove(&format!("{day}:{domain}"));
            }
        }
    }

    /// Sends yesterday's reports after midnight UTC, until `stop`: every
    /// five minutes the domains no process has sent yet are tried (a
    /// failed one is given back and tried again).
    pub async fn daily(
        &self,
        queue: Queue,
        resolver: TokioResolver,
        https: TlsConnector,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            }
            let yesterday = day(1);
            match self.send(&yesterday, &queue, &resolver, &https, true).await {
                Ok(lines) if lines.is_empty() => {}
                Ok(lines) => {
                    tracing::info!(day = %yesterday, reports = lines.len(), "TLS reports done")
                }
                Err(e) => {
                    tracing::warn!(day = %yesterday, error = %e, "TLS reports not sent; trying later")
                }
            }
        }
    }

    /// The report as mail (RFC 8460 §5.3), from the null sender so that
    /// nothing bounces back.
    fn message(&self, day: &str, domain: &str, id: &str, to: &str, gz: &[u8]) -> QueuedMessage {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let boundary = format!("tlsrpt-{}", correu_queue::id::new_queue_id());
        // RFC 8460 §5.3.1: sender!policy-domain!begin!end!id, times in
        // Unix seconds.
        let begin = day_start(day);
        let file = format!(
            "{}!{domain}!{begin}!{}!{}.json.gz",
            self.hostname,
            begin + 86_399,
            id.replace(['@', '!'], "_")
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(gz);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        let content = format!(
            "From: TLS reports <noreply-tlsrpt@{host}>\r\nTo: <{to}>\r\nSubject: Report Domain: {domain} Submitter: {org} Report-ID: <{id}>\r\nDate: {date}\r\nMessage-ID: <{id}>\r\nTLS-Report-Domain: {domain}\r\nTLS-Report-Submitter: {org}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe TLS report of {org} for {domain} on {day} (RFC 8460).\r\n\r\n--{boundary}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n\tfilename=\"{file}\"\r\n\r\n{body}\r\n--{boundary}--\r\n",
            host = self.hostname,
            org = self.organization,
            date = correu_smtp::headers::rfc5322_date(now),
            body = lines.join("\r\n"),
        );
        QueuedMessage {
            queue_id: correu_queue::id::new_queue_id(),
            sender: String::new(),
            recipients: vec![Recipient {
                address: to.to_string(),
                ..Recipient::default()
            }],
            received_at_unix_micros: now * 1_000_000,
            content: content.into_bytes(),
            tls_report: true,
            ..QueuedMessage::default()
        }
    }
}

/// A counter's name: everything a report groups by, as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
struct Counter {
    policy_type: String,
    policy_string: Vec<String>,
    mx_host: Vec<String>,
    /// `None` for a success.
    result_type: Option<String>,
    mx: String,
    ip: String,
}

fn counter(s: &Session<'_>) -> String {
    let (policy_type, policy_string, mx_host) = match (s.tlsa, s.policy) {
        (Some(t), _) => ("tlsa", t.to_vec(), vec![s.mx.to_ascii_lowercase()]),
        (None, Some(p)) => ("sts", p.lines(), p.mx.clone()),
        (None, None) => ("no-policy-found", Vec::new(), Vec::new()),
    };
    let failed = s.failure.is_some();
    let c = Counter {
        policy_type: policy_type.into(),
        policy_string,
        mx_host,
        result_type: s.failure.map(Into::into),
        // A success is counted per policy only.
        mx: if failed {
            s.mx.to_ascii_lowercase()
        } else {
            String::new()
        },
        ip: if failed {
            s.ip.to_string()
        } else {
            String::new()
        },
    };
    serde_json::to_string(&c).unwrap_or_default()
}

/// Unix seconds at the start of `day` (`YYYY-MM-DD`, UTC).
fn day_start(day: &str) -> i64 {
    let part =
        |r: std::ops::Range<usize>| day.get(r).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let (y, m, d) = (part(0..4), part(5..7), part(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400
}

fn report_id(day: &str, domain: &str, hostname: &str) -> String {
    format!("{day}.{domain}@{hostname}")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(bytes);
    e.finish().unwrap_or_default()
}

/// The reporting addresses `domain` publishes (`_smtp._tls.DOMAIN`):
/// `None` when it publishes none; an error when DNS could not say.
async fn rua(resolver: &TokioResolver, domain: &str) -> Result<Option<Vec<String>>, String> {
    let name = format!("_smtp._tls.{}.", domain.trim_end_matches('.'));
    let lookup = match resolver.txt_lookup(name.as_str()).await {
        Ok(l) => l,
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    Ok(lookup.answers().iter().find_map(|r| match &r.data {
        RData::TXT(txt) => parse_record(
            &txt.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect::<String>(),
        ),
        _ => None,
    }))
}

/// `v=TLSRPTv1; rua=mailto:a@b,https://c/d` → the URIs (RFC 8460 §3).
fn parse_record(text: &str) -> Option<Vec<String>> {
    let mut fields = text.split(';').map(str::trim);
    if !fields.next()?.eq_ignore_ascii_case("v=TLSRPTv1") {
        return None;
    }
    let rua = fields.find_map(|f| f.strip_prefix("rua="))?;
    let uris: Vec<String> = rua
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    (!uris.is_empty()).then_some(uris)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_starts_at_its_unix_second() {
        assert_eq!(day_start("1970-01-01"), 0);
        assert_eq!(day_start("2025-12-02"), 1_764_633_600);
        assert_eq!(day_start("2024-02-29"), 1_709_164_800);
    }

    #[test]
    fn parses_the_rfc_examples() {
        assert_eq!(
            parse_record("v=TLSRPTv1; rua=mailto:reports@example.com"),
            Some(vec!["mailto:reports@example.com".into()])
        );
        assert_eq!(
            parse_record("v=TLSRPTv1;rua=mailto:a@x.test,https://reporting.example.com/v1/tlsrpt"),
            Some(vec![
                "mailto:a@x.test".into(),
                "https://reporting.example.com/v1/tlsrpt".into()
            ])
        );
        assert_eq!(parse_record("v=spf1 -all"), None);
        assert_eq!(parse_record("v=TLSRPTv1;"), None);
    }

    #[tokio::test]
    async fn a_day_of_sessions_makes_one_report_per_domain() {
        let cfg = Config {
            hostname: "mx.correu.test".into(),
            ..Config::default()
        };
        let r = TlsReports::open(&cfg, None, true).unwrap();
        let policy = mta_sts::Policy::parse(
            "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n",
        )
        .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for failure in [None, None, Some("certificate-host-mismatch")] {
            r.record(&Session {
                domain: "Example.com",
                policy: Some(&policy),
                tlsa: None,
                mx: "mx1.example.com",
                ip,
                failure,
            })
            .await;
        }
        r.record(&Session {
            domain: "plain.test",
            policy: None,
            tlsa: None,
            mx: "mx.plain.test",
            ip,
            failure: Some("starttls-not-supported"),
        })
        .await;
        let reports = r.reports(&day(0)).await.unwrap();
        assert_eq!(reports.len(), 2);
        let (domain, rep) = &reports[0];
        assert_eq!(domain, "example.com");
        assert_eq!(rep["organization-name"], "mx.correu.test");
        assert_eq!(rep["contact-info"], "postmaster@mx.correu.test");
        let p = &rep["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["policy-string"][1], "mode: enforce");
        assert_eq!(p["policy"]["mx-host"][0], "*.example.com");
        assert_eq!(p["summary"]["total-successful-session-count"], 2);
        assert_eq!(p["summary"]["total-failure-session-count"], 1);
        assert_eq!(
            p["failure-details"][0]["result-type"],
            "certificate-host-mismatch"
        );
        assert_eq!(p["failure-details"][0]["receiving-ip"], "192.0.2.1");
        let plain = &reports[1].1["policies"][0];
        assert_eq!(plain["policy"]["policy-type"], "no-policy-found");
        assert_eq!(plain["summary"]["total-failure-session-count"], 1);
    }

    /// A DANE host's sessions count under its TLSA records, and a
    /// certificate they do not match is `tlsa-invalid`.
    #[tokio::test]
    async fn dane_sessions_count_under_the_tlsa_policy() {
        let r = TlsReports::open(&Config::default(), None, true).unwrap();
        let tlsa = vec!["3 1 1 ab12".to_string()];
        let mismatch = crate::client::SessionError::TlsRequired(
            "mx.dane.test: unexpected error: DANE: no TLSA record matches the server's certificate chain".into(),
        );
        for failure in [None, result_type(&mismatch)] {
            r.record(&Session {
                domain: "dane.test",
                policy: None,
                tlsa: Some(&tlsa),
                mx: "MX.dane.test",
                ip: "192.0.2.2".parse().unwrap(),
                failure,
            })
            .await;
        }
        let reports = r.reports(&day(0)).await.unwrap();
        let p = &reports[0].1["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "tlsa");
        assert_eq!(p["policy"]["policy-string"][0], "3 1 1 ab12");
        assert_eq!(p["policy"]["mx-host"][0], "mx.dane.test");
        assert_eq!(p["summary"]["total-successful-session-count"], 1);
        assert_eq!(p["failure-details"][0]["result-type"], "tlsa-invalid");
    }
}
