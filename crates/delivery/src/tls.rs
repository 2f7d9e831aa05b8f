//! TLS for outbound SMTP: opportunistic (encrypt whenever the server offers
//! STARTTLS, accept any certificate: what Postfix's `may` level does, since
//! an MX's certificate is rarely verifiable) or required (the certificate
//! must verify against the system's roots, or a configured CA, for the
//! host's name; otherwise the message waits).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The three signature methods of a [`ServerCertVerifier`], checked with
/// the algorithms in the named field of `self` (one copy for every
/// verifier here).
macro_rules! signatures_checked_by {
    ($($field:tt)+) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$($field)+)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$($field)+)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($field)+.supported_schemes()
        }
    };
}
pub(crate) use signatures_checked_by;

/// How a hop is to be encrypted.
#[derive(Clone)]
pub enum TlsPolicy {
    /// Plain SMTP only (for tests and odd relays).
    None,
    /// STARTTLS whenever offered, without verifying the certificate.
    Opportunistic(TlsConnector),
    /// STARTTLS with a verified certificate, or no delivery.
    Required(TlsConnector),
    /// STARTTLS checked against the host's TLSA records (crate::dane), or
    /// no delivery; `false` when its records were all unusable (then any
    /// certificate, but never plaintext).
    Dane(TlsConnector, bool),
}

impl TlsPolicy {
    pub fn connector(&self) -> Option<&TlsConnector> {
        match self {
            TlsPolicy::None => None,
            TlsPolicy::Opportunistic(c) | TlsPolicy::Required(c) | TlsPolicy::Dane(c, _) => Some(c),
        }
    }

    pub fn required(&self) -> bool {
        matches!(self, TlsPolicy::Required(_) | TlsPolicy::Dane(..))
    }

    /// How the server's certificate is checked, for the delivery log:
    /// `dane`, `ca`, or `none` (encrypted, not authenticated).
    pub fn verification(&self) -> &'static str {
        match self {
            TlsPolicy::Required(_) => "ca",
            TlsPolicy::Dane(_, true) => "dane",
            _ => "none",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, rustls::Error> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// The opportunistic connector.
pub fn opportunistic() -> Result<TlsConnector, rustls::Error> {
    let algs = provider().signature_verification_algorithms;
    let config = builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(algs)))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The verifying connector: the system's roots, plus `extra_ca` (PEM) when given.
pub fn verified(extra_ca: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "a system certificate could not be loaded");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        {
            roots.add(cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)?;
        }
    }
    tracing::debug!(system_roots = added, "verifying TLS connector ready");
    let config = builder()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts any certificate, but still checks the handshake signatures with
/// the provider's algorithms: the connection is encrypted to whoever holds
/// the key, which is what opportunistic TLS promises.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked_by!(0);
}

/// "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384", for logs.
pub fn describe<S>(s: &TlsStream<S>) -> String {
    correu_runtime::tls::describe(s.get_ref().1)
}
