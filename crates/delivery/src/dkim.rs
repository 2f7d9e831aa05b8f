//! DKIM signing of outbound mail (RFC 6376, RFC 8463) with the `mail-auth`
//! crate: rsa-sha256 and ed25519-sha256, keys from PEM files, the signing
//! domain chosen by the message's From: address.

use std::collections::HashMap;

use correu_runtime::config::{DkimAlgorithm, DkimConfig};
use correu_runtime::keys::SigningKey;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};

/// Headers signed when present (and over-signed for From and Subject).
const SIGNED: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// A signer ready for its domain: the key, the selector, the headers.
enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// The keys of every signing domain.
pub struct Dkim {
    signers: HashMap<String, Signer>,
}

impl Dkim {
    /// Loads every key now: a bad key stops the start.
    pub fn new(keys: &std::collections::BTreeMap<String, DkimConfig>) -> anyhow::Result<Dkim> {
        let mut signers = HashMap::new();
        for (domain, k) in keys {
            let key = correu_runtime::keys::load(&k.key_file, k.algorithm)
                .map_err(|e| anyhow::anyhow!("delivery.dkim.{domain}: {e}"))?;
            let d = domain.to_lowercase();
            let signer = match key {
                SigningKey::Rsa(k2) => Signer::Rsa(
                    DkimSigner::from_key(k2)
                        .domain(&d)
                        .selector(&k.selector)
                        .headers(SIGNED),
                ),
                SigningKey::Ed25519(k2) => Signer::Ed25519(
                    DkimSigner::from_key(k2)
                        .domain(&d)
                        .selector(&k.selector)
                        .headers(SIGNED),
                ),
            };
            signers.insert(d, signer);
        }
        Ok(Dkim { signers })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// The `DKIM-Signature:` header for `message`, or `None` when its
    /// From: domain has no key.
    pub fn sign(&self, message: &[u8]) -> Result<Option<String>, SignError> {
        let Some(domain) = from_domain(message) else {
            return Ok(None);
        };
        let Some(signer) = self.signers.get(&domain) else {
            return Ok(None);
        };
        let signed = match signer {
            Signer::Rsa(s) => s.sign(message),
            Signer::Ed25519(s) => s.sign(message),
        };
        signed
            .map(|sig| Some(sig.to_header()))
            .map_err(|source| SignError { domain, source })
    }
}

/// Signing failed (the message could not be canonicalised or hashed).
#[derive(Debug, thiserror::Error)]
#[error("DKIM signing for {domain}: {source}")]
pub struct SignError {
    pub domain: String,
    #[source]
    pub source: mail_auth::Error,
}

/// The domain of the first address in the From: header, lower-cased.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next()?;
    let mut value = None;
    for line in head.split("\r\n") {
        match &mut value {
            Some(v) if line.starts_with([' ', '\t']) => {
                let v: &mut String = v;
                v.push_str(line);
            }
            Some(_) => break,
            None => {
                if let Some((name, rest)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("From")
                {
                    value = Some(rest.to_string());
                }
            }
        }
    }
    let value = value?;
    let addr = match (value.find('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.trim(),
    };
    let domain = addr
        .rsplit_once('@')?
        .1
        .trim()
        .trim_end_matches(['>', ',', ';']);
    (!domain.is_empty()).then(|| domain.to_lowercase())
}

/// A new key pair, as `correu dkim keygen` prints it: the private key in
/// PEM and the DNS TXT record's value.
pub fn keygen(algorithm: DkimAlgorithm) -> anyhow::Result<(String, String)> {
    use mail_auth::dkim::generate::DkimKeyPair;
    let (pair, label, k) = match algorithm {
        DkimAlgorithm::RsaSha256 => (DkimKeyPair::generate_rsa(2048)?, "RSA PRIVATE KEY", "rsa"),
        DkimAlgorithm::Ed25519Sha256 => {
            (DkimKeyPair::generate_ed25519()?, "PRIVATE KEY", "ed25519")
        }
    };
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(pair.private_key());
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    let txt = format!("v=DKIM1; k={k}; p={}", b64.encode(pair.public_key()));
    Ok((pem, txt))
}

#[cfg(test)]
// Test set-up writes its key files before anything reads them.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_from_domain() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (
                b"From: Jo <jo@Domini.COM>\r\nTo: x@y.z\r\n\r\nbody",
                Some("domini.com"),
            ),
            (b"Subject: x\r\nfrom: jo@a.org\r\n\r\n", Some("a.org")),
            (
                b"From:\r\n\t\"Jo\" <jo@folded.example>\r\n\r\n",
                Some("folded.example"),
            ),
            (b"Subject: no from\r\n\r\nFrom: jo@body.example\r\n", None),
        ];
        for (msg, want) in cases {
            assert_eq!(
                from_domain(msg).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn generated_keys_sign() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, name) in [
            (DkimAlgorithm::RsaSha256, "rsa"),
            (DkimAlgorithm::Ed25519Sha256, "ed"),
        ] {
            let (pem, txt) = keygen(alg).unwrap();
            assert!(txt.starts_with("v=DKIM1; k="), "{txt}");
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            let mut keys = std::collections::BTreeMap::new();
            keys.insert(
                "a.org".to_string(),
                DkimConfig {
                    selector: "s1".into(),
                    key_file: path,
                    algorithm: alg,
                },
            );
            let d = Dkim::new(&keys).unwrap();
            let header = d
                .sign(b"From: jo@a.org\r\nSubject: hi\r\n\r\nbody\r\n")
                .unwrap()
                .unwrap();
            assert!(header.starts_with("DKIM-Signature: v=1; a="), "{header}");
            assert!(
                header.contains("d=a.org") && header.contains("s=s1"),
                "{header}"
            );
            assert!(
                d.sign(b"From: jo@b.org\r\n\r\nbody\r\n").unwrap().is_none(),
                "no key for b.org"
            );
        }
    }
}
