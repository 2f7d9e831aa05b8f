//! MTA-STS (RFC 8461): a domain says, in a TXT record at `_mta-sts.DOMAIN`
//! and a policy at `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, which
//! MX hosts are its own and that they must be reached over verified TLS.
//!
//! In `enforce` mode only the named MX hosts are tried, with the verifying
//! connector; a message that cannot go that way waits in the retry tiers.
//! `testing` changes nothing but is logged; `none` withdraws a policy.
//! Policies are cached for their `max_age` and refetched when the TXT
//! record's `id` changes; when the record or the fetch fails, an unexpired
//! cached policy still applies (§5.1), so an attacker who blocks the fetch
//! cannot turn enforcement off for a domain already seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use http_body_util::Empty;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest policy read (RFC 8461 §3.3 suggests 64 KiB).
const MAX_POLICY: usize = 64 * 1024;
/// The longest `max_age` honoured (RFC 8461 §3.2: one year).
const MAX_AGE: u64 = 31_557_600;

/// A policy text RFC 8461 §3.2 does not allow, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Why a domain's policy could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("TXT lookup of _mta-sts.{domain}: {source}")]
    Txt {
        domain: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("{host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: TLS: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: {source}")]
    Http {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{host} answered {status}")]
    Status {
        host: String,
        status: http::StatusCode,
    },
    #[error("{host} sent {media:?}, not text/plain")]
    MediaType { host: String, media: String },
    #[error("{host}: reading the policy: {source}")]
    Body {
        host: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{host}: bad policy: {source}")]
    Invalid {
        host: String,
        #[source]
        source: ParseError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns: a host name, or `*.` and a domain for one more label.
    pub mx: Vec<String>,
    pub max_age: Duration,
}

impl Policy {
    /// The policy's lines, as a TLS report's `policy-string` gives them
    /// (RFC 8460 §4.4).
    pub fn lines(&self) -> Vec<String> {
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        };
        let mut out = vec!["version: STSv1".to_string(), format!("mode: {mode}")];
        out.extend(self.mx.iter().map(|m| format!("mx: {m}")));
        out.push(format!("max_age: {}", self.max_age.as_secs()));
        out
    }

    /// RFC 8461 §3.2: `key: value` lines (CRLF or LF); `version`, `mode`
    /// and `max_age` required, `mx` at least once unless the mode is
    /// `none`; unknown keys ignored; the first of a repeated key wins.
    pub fn parse(text: &str) -> Result<Policy, ParseError> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(ParseError(format!("not a `key: value` line: {line:?}")));
            };
            let value = value.trim_matches([' ', '\t']);
            match key {
                "version" => {
                    version.get_or_insert(value);
                }
                "mode" => {
                    mode.get_or_insert(value);
                }
                "max_age" => {
                    max_age.get_or_insert(value);
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version != Some("STSv1") {
            return Err(ParseError(format!("version is {version:?}, not STSv1")));
        }
        let mode = match mode {
            Some("enforce") => Mode::Enforce,
            Some("testing") => Mode::Testing,
            Some("none") => Mode::None,
            other => return Err(ParseError(format!("mode is {other:?}"))),
        };
        let max_age = match max_age {
            Some(v) if !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()) => v
                .parse::<u64>()
                .map_err(|e| ParseError(e.to_string()))?
                .min(MAX_AGE),
            other => return Err(ParseError(format!("max_age is {other:?}"))),
        };
        if mode != Mode::None && mx.is_empty() {
            return Err(ParseError("no mx line".into()));
        }
        Ok(Policy {
            mode,
            mx,
            max_age: Duration::from_secs(max_age),
        })
    }

    /// Whether `host` is one of the policy's MX hosts (RFC 8461 §4.1): an
    /// exact name, or `*.domain` standing for exactly one more label.
    pub fn names(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// The `id` of a domain's `_mta-sts` TXT record (RFC 8461 §3.1), from the
/// record's strings: exactly one record beginning `v=STSv1;`, with an `id`
/// of 1 to 32 letters and digits. Anything else is no policy.
pub fn record_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1;") || r.as_str() == "v=STSv1")
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=')?;
        if key == "id" && id.is_none() {
            id = Some(value);
        }
    }
    let id = id?;
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_string())
}

struct Cached {
    id: String,
    policy: Arc<Policy>,
    expires: Instant,
}

/// Looks policies up and keeps them.
pub struct MtaSts {
    resolver: TokioResolver,
    connector: TlsConnector,
    port: u16,
    timeout: Duration,
    cache: Mutex<HashMap<String, Cached>>,
}

impl MtaSts {
    /// `connector` verifies certificates (the policy host's must be valid
    /// for `mta-sts.DOMAIN`, RFC 8461 §3.3).
    pub fn new(
        resolver: TokioResolver,
        connector: TlsConnector,
        port: u16,
        timeout: Duration,
    ) -> Self {
        MtaSts {
            resolver,
            connector,
            port,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        // A panic while holding this lock leaves a map that is still whole.
        correu_runtime::sync::lock(&self.cache)
    }

    /// The policy in force for `domain`, if it has one.
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = {
            let mut cache = self.cache();
            cache.retain(|_, c| c.expires > Instant::now());
            cache.get(&domain).map(|c| (c.id.clone(), c.policy.clone()))
        };
        let id = match self.txt_id(&domain).await {
            Ok(Some(id)) => id,
            Ok(None) | Err(_) => return cached.map(|(_, p)| p),
        };
        if let Some((cached_id, policy)) = &cached
            && *cached_id == id
        {
            return Some(policy.clone());
        }
        match tokio::time::timeout(self.timeout, self.fetch(&domain)).await {
            Ok(Ok(policy)) => {
                tracing::info!(%domain, %id, mode = ?policy.mode, mx = ?policy.mx, max_age = policy.max_age.as_secs(), "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.cache().insert(
                    domain,
                    Cached {
                        id,
                        policy: policy.clone(),
                        expires: Instant::now() + policy.max_age,
                    },
                );
                Some(policy)
            }
            Ok(Err(e)) => {
                tracing::warn!(%domain, error = %e, "MTA-STS policy could not be fetched");
                cached.map(|(_, p)| p)
            }
            Err(_) => {
                tracing::warn!(%domain, timeout = ?self.timeout, "MTA-STS policy fetch timed out");
                cached.map(|(_, p)| p)
            }
        }
    }

    async fn txt_id(&self, domain: &str) -> Result<Option<String>, PolicyError> {
        let name = format!("_mta-sts.{domain}.");
        match self.resolver.txt_lookup(name.as_str()).await {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                Ok(record_id(&records))
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(None),
            Err(source) => {
                tracing::debug!(%domain, error = %source, "MTA-STS TXT lookup failed");
                Err(PolicyError::Txt {
                    domain: domain.to_string(),
                    source,
                })
            }
        }
    }

    /// GET the policy: HTTPS with a verified certificate, no redirects,
    /// `200` only, `text/plain`, at most 64 KiB (RFC 8461 §3.3).
    async fn fetch(&self, domain: &str) -> Result<Policy, PolicyError> {
        let host = format!("mta-sts.{domain}");
        let h = || host.clone();
        let ips = self
            .resolver
            .lookup_ip(format!("{host}.").as_str())
            .await
            .map_err(|source| PolicyError::Resolve { host: h(), source })?;
        let ip = ips
            .iter()
            .next()
            .ok_or_else(|| PolicyError::NoAddress { host: h() })?;
        let tcp = TcpStream::connect((ip, self.port))
            .await
            .map_err(|source| PolicyError::Connect { host: h(), source })?;
        let name = ServerName::try_from(host.clone()).map_err(|e| PolicyError::Tls {
            host: h(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|source| PolicyError::Tls { host: h(), source })?;
        let request = http::Request::get("/.well-known/mta-sts.txt")
            .header(http::header::HOST, &host)
            .header(http::header::USER_AGENT, "correu")
            .body(Empty::<Bytes>::new())
            .map_err(|e| PolicyError::Body {
                host: h(),
                source: Box::new(e),
            })?;
        let (head, body) = crate::http::exchange(tls, request, MAX_POLICY)
            .await
            .map_err(|source| PolicyError::Http { host: h(), source })?;
        if head.status != http::StatusCode::OK {
            return Err(PolicyError::Status {
                host: h(),
                status: head.status,
            });
        }
        let media = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !media.to_ascii_lowercase().starts_with("text/plain") {
            return Err(PolicyError::MediaType { host: h(), media });
        }
        let body = body.map_err(|source| PolicyError::Body { host: h(), source })?;
        let text = std::str::from_utf8(&body).map_err(|e| PolicyError::Body {
            host: h(),
            source: Box::new(e),
        })?;
        Policy::parse(text).map_err(|source| PolicyError::Invalid { host: h(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rfc_example() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        assert_eq!(p.max_age, Duration::from_secs(604_800));
    }

    #[test]
    fn rejects_what_the_rfc_rejects() {
        for (text, why) in [
            ("mode: enforce\nmx: a.b\nmax_age: 1\n", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "version",
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
                "mode",
            ),
            ("version: STSv1\nmode: enforce\nmx: a.b\n", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
                "max_age",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
            (
                "version: STSv1\nmode enforce\nmx: a.b\nmax_age: 1\n",
                "line",
            ),
        ] {
            assert!(Policy::parse(text).is_err(), "{why}: {text:?}");
        }
    }

    #[test]
    fn lf_lines_unknown_keys_and_mode_none() {
        let p =
            Policy::parse("version: STSv1\nmode: none\nmax_age: 86400\nextension: x\n").unwrap();
        assert_eq!(p.mode, Mode::None);
        assert!(p.mx.is_empty());
        // A year at most.
        let p =
            Policy::parse("version: STSv1\nmode: testing\nmx: a.b\nmax_age: 9999999999\n").unwrap();
        assert_eq!(p.max_age, Duration::from_secs(MAX_AGE));
    }

    #[test]
    fn mx_patterns_match_one_label() {
        let p = Policy::parse(
            "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 1\n",
        )
        .unwrap();
        for (host, want) in [
            ("mail.example.com", true),
            ("MAIL.Example.COM.", true),
            ("other.example.com", false),
            ("mx1.example.net", true),
            ("example.net", false),
            ("a.mx1.example.net", false),
            (".example.net", false),
        ] {
            assert_eq!(p.names(host), want, "{host}");
        }
    }

    #[test]
    fn txt_records() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            record_id(&s(&["v=STSv1; id=20160831085700Z;"])).as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(
            record_id(&s(&["v=spf1 -all", "v=STSv1;id=abc"])).as_deref(),
            Some("abc")
        );
        for bad in [
            &["v=STSv1; id=a;", "v=STSv1; id=b;"][..],
            &["v=STSv1;"],
            &["v=STSv1; id=not-alnum;"],
            &["v=STSv1; id=123456789012345678901234567890123;"],
            &["id=abc; v=STSv1;"],
            &[],
        ] {
            assert_eq!(record_id(&s(bad)), None, "{bad:?}");
        }
    }
}
