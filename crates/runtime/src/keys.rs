//! Signing keys from PEM files, for DKIM signatures (delivery) and ARC
//! seals (ingress): rsa-sha256 (PKCS#1 or PKCS#8) and ed25519-sha256
//! (PKCS#8), as `correu dkim keygen` writes them.

use std::path::Path;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::config::DkimAlgorithm;

pub enum SigningKey {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// Reads the key at `path`; the error names the file.
pub fn load(path: &Path, algorithm: DkimAlgorithm) -> anyhow::Result<SigningKey> {
    // Read at start, before the runtime serves anything.
    let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    from_pem(&pem, algorithm).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The key in `pem` (a PEM file's bytes).
pub fn from_pem(pem: &[u8], algorithm: DkimAlgorithm) -> anyhow::Result<SigningKey> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(match (algorithm, der) {
        (DkimAlgorithm::RsaSha256, der) => SigningKey::Rsa(
            RsaKey::<Sha256>::from_key_der(der).map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        (DkimAlgorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(der)) => SigningKey::Ed25519(
            Ed25519Key::from_pkcs8_der(der.secret_pkcs8_der())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        (DkimAlgorithm::Ed25519Sha256, _) => {
            anyhow::bail!("an Ed25519 key must be PKCS#8")
        }
    })
}
