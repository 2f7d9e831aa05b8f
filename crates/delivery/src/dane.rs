//! DANE for SMTP (RFC 7672, with RFC 7671's updates): an MX host whose
//! name and addresses come from DNSSEC-signed zones, and which publishes
//! TLSA records at `_25._tcp.<host>`, gets TLS authenticated by those
//! records or no mail at all.
//!
//! - `DANE-EE(3)`: the server's own certificate (selector `0`) or public
//!   key (selector `1`) matches; names and dates are not checked (§3.1.1).
//! - `DANE-TA(2)`: a certificate the server sends in its chain matches;
//!   the chain from it to the server's certificate must verify for the MX
//!   host's name (§3.1.2).
//! - Matching `0` (exact), `1` (SHA-256) or `2` (SHA-512).
//! - `PKIX-TA(0)`, `PKIX-EE(1)` and unknown parameters are unusable
//!   (§3.1.3); a host whose TLSA records are all unusable still gets
//!   mandatory TLS, unauthenticated.
//!
//! The DNSSEC validation is hickory's, from the trust anchors of
//! `dns.trust_anchor` (the IANA root keys by default). An insecure zone
//! or no TLSA record means opportunistic TLS, as before; a bogus answer or
//! a failed TLSA lookup for a secure host defers the message (§2.2).

use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;
use tokio_rustls::TlsConnector;

/// One usable TLSA record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    /// `DANE-TA(2)` rather than `DANE-EE(3)`.
    pub trust_anchor: bool,
    /// The public key (`1`) rather than the whole certificate (`0`).
    pub spki: bool,
    pub matching: Matching,
    pub data: Vec<u8>,
}

impl Association {
    /// Whether `cert` is the one this record names.
    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected = if self.spki {
            match webpki::anchor_from_trusted_cert(cert) {
                Ok(a) => webpki::spki_for_anchor(&a).as_ref().to_vec(),
                Err(_) => return false,
            }
        } else {
            cert.as_ref().to_vec()
        };
        match self.matching {
            Matching::Raw => selected == self.data,
            Matching::Sha256 => sha2::Sha256::digest(&selected).as_slice() == self.data,
            Matching::Sha512 => sha2::Sha512::digest(&selected).as_slice() == self.data,
            _ => false,
        }
    }
}

/// A host's DANE policy: its usable TLSA records (none: TLS is mandatory
/// but unauthenticated), and a connector that checks them.
#[derive(Clone)]
pub struct Policy {
    pub records: Arc<Vec<Association>>,
    /// The records as published (`3 1 1 ab12…`), for TLS reports.
    pub published: Arc<Vec<String>>,
    pub connector: TlsConnector,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.records == other.records
    }
}

impl Eq for Policy {}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("published", &self.published)
            .finish()
    }
}

/// Whether every answer of a lookup that is not a signature was proven
/// secure by DNSSEC.
pub fn secure(records: &[Record]) -> bool {
    let mut data = records
        .iter()
        .filter(|r| r.record_type() != RecordType::RRSIG)
        .peekable();
    data.peek().is_some() && data.all(|r| r.proof == Proof::Secure)
}

/// Whether a lookup failed for an answer DNSSEC proved bogus (hickory's
/// validating resolver gives an error rather than the records).
pub fn bogus_error(e: &hickory_resolver::net::NetError) -> bool {
    use hickory_resolver::net::{DnsError, NetError};
    matches!(e, NetError::Dns(DnsError::DnssecBogus))
}

/// A denial (`Some(true)`: no such name; `Some(false)`: no such record)
/// that DNSSEC could not prove but did not find bogus either (an insecure
/// zone's NSEC3 with too many iterations, say): as a plain resolver's.
pub fn unproven_denial(e: &hickory_resolver::net::NetError) -> Option<bool> {
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    match e {
        NetError::Dns(DnsError::Nsec {
            proof, response, ..
        }) if *proof != Proof::Bogus => {
            Some(response.metadata.response_code == ResponseCode::NXDomain)
        }
        _ => None,
    }
}

/// Whether any answer failed DNSSEC validation.
pub fn bogus(records: &[Record]) -> bool {
    records.iter().any(|r| r.proof == Proof::Bogus)
}

/// The DANE policy of `host` (whose name and addresses are secure), from
/// its TLSA records at `_<port>._tcp.<host>`: `None` when it has none, or
/// they are not secure; an error (the message waits) when the lookup
/// failed or the answer was bogus.
pub async fn lookup(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Option<Policy>, String> {
    let name = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
    let answers = match resolver.lookup(name.as_str(), RecordType::TLSA).await {
        Ok(l) => l.answers().to_vec(),
        Err(e) if e.is_no_records_found() || unproven_denial(&e).is_some() => return Ok(None),
        Err(e) if bogus_error(&e) => {
            return Err(format!(
                "DANE: the TLSA records of {name} failed DNSSEC validation"
            ));
        }
        Err(e) => {
            return Err(format!(
                "DANE: the TLSA lookup of {name} failed ({e}); not delivering without it"
            ));
        }
    };
    if bogus(&answers) {
        return Err(format!(
            "DANE: the TLSA records of {name} failed DNSSEC validation"
        ));
    }
    // Insecure: no DANE (opportunistic); anything else short of secure
    // (indeterminate) is not a denial either, and the host waits.
    let data = || {
        answers
            .iter()
            .filter(|r| r.record_type() != RecordType::RRSIG)
    };
    if data().all(|r| r.proof == Proof::Insecure) {
        return Ok(None);
    }
    if !secure(&answers) {
        return Err(format!(
            "DANE: the TLSA records of {name} are neither proven secure nor insecure"
        ));
    }
    let mut records = Vec::new();
    let mut published = Vec::new();
    for r in &answers {
        let RData::TLSA(t) = &r.data else { continue };
        published.push(t.to_string());
        let trust_anchor = match t.cert_usage {
            CertUsage::DaneEe => false,
            CertUsage::DaneTa => true,
            _ => continue,
        };
        let spki = match t.selector {
            Selector::Full => false,
            Selector::Spki => true,
            _ => continue,
        };
        if !matches!(
            t.matching,
            Matching::Raw | Matching::Sha256 | Matching::Sha512
        ) {
            continue;
        }
        records.push(Association {
            trust_anchor,
            spki,
            matching: t.matching,
            data: t.cert_data.clone(),
        });
    }
    if published.is_empty() {
        return Ok(None);
    }
    let records = Arc::new(records);
    Ok(Some(Policy {
        connector: connector(records.clone()).map_err(|e| format!("DANE: {e}"))?,
        records,
        published: Arc::new(published),
    }))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS connector that accepts only a server that `records` authenticate
/// (any server, encrypted, when there are none).
fn connector(records: Arc<Vec<Association>>) -> Result<TlsConnector, rustls::Error> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { records, provider }))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Checks a server's chain against its TLSA records.
#[derive(Debug)]
struct Verifier {
    records: Arc<Vec<Association>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // All records unusable: encrypted, not authenticated (§3.1.3).
        if self.records.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        if self
            .records
            .iter()
            .any(|r| !r.trust_anchor && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        for ca in intermediates {
            if !self.records.iter().any(|r| r.trust_anchor && r.matches(ca)) {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if roots.add(ca.clone().into_owned()).is_err() {
                continue;
            }
            let chain =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(format!("DANE: {e}")))?;
            return chain
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    rustls::Error::General(format!(
                        "DANE: the chain to the DANE-TA certificate does not verify: {e}"
                    ))
                });
        }
        Err(rustls::Error::General(
            "DANE: no TLSA record matches the server's certificate chain (tlsa mismatch)".into(),
        ))
    }

    crate::tls::signatures_checked_by!(provider.signature_verification_algorithms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::Name;
    use hickory_resolver::proto::rr::rdata::A;

    fn a(proof: Proof) -> Record {
        let mut r = Record::from_rdata(
            Name::from_ascii("mx.example.").unwrap_or_default(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        );
        r.proof = proof;
        r
    }

    #[test]
    fn an_answer_is_secure_only_when_every_record_is() {
        assert!(secure(&[a(Proof::Secure), a(Proof::Secure)]));
        assert!(!secure(&[a(Proof::Secure), a(Proof::Insecure)]));
        assert!(!secure(&[a(Proof::Indeterminate)]));
        assert!(!secure(&[]), "no answer proves nothing");
        assert!(bogus(&[a(Proof::Secure), a(Proof::Bogus)]));
        assert!(!bogus(&[a(Proof::Insecure)]));
    }
}
