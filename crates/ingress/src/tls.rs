//! TLS for STARTTLS and implicit TLS: rustls (no OpenSSL), TLS 1.2 and 1.3
//! with rustls's AEAD-only cipher suites, the certificate reloaded when its
//! files change (Kubernetes rotates Secrets in place).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use correu_runtime::sync::{read, write};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {0}: {1}")]
    Certificate(PathBuf, String),
    #[error("cannot read private key {0}: {1}")]
    Key(PathBuf, String),
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The current TLS configuration, replaced when the files change.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    stamp: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

// Blocking, on purpose: called before the listeners start and from
// `spawn_blocking` in `watch`, never on a Tokio worker.
#[allow(clippy::disallowed_methods)]
fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Builds a rustls configuration from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Certificate(cert.into(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate(cert.into(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate(
            cert.into(),
            "no certificate in the file".into(),
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key(key.into(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    // The server picks the cipher suite: its order is the modern one.
    config.ignore_client_order = true;
    Ok(config)
}

impl Tls {
    /// Loads the files now; fails the start if they are bad.
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Tls>, TlsError> {
        let config = load(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.into(),
            key: key.into(),
            current: RwLock::new(Arc::new(config)),
            stamp: RwLock::new((modified(cert), modified(key))),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let config = read(&self.current).clone();
        TlsAcceptor::from(config)
    }

    /// Reloads if either file changed; a bad new pair is logged and the old
    /// one kept. Returns whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (modified(&self.cert), modified(&self.key));
        if *read(&self.stamp) == now {
            return false;
        }
        *write(&self.stamp) = now;
        match load(&self.cert, &self.key) {
            Ok(config) => {
                *write(&self.current) = Arc::new(config);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "new TLS certificate is unusable; keeping the old one");
                false
            }
        }
    }

    /// Checks the files every few seconds until `stop`.
    pub fn watch(self: Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RELOAD_CHECK) => {}
                }
                let me = self.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                    tracing::error!(error = %e, "certificate reload task failed");
                }
            }
        })
    }
}

/// "TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384", for Received and logs.
pub fn describe<S>(s: &TlsStream<S>) -> String {
    correu_runtime::tls::describe(s.get_ref().1)
}

/// A stream that is plain until STARTTLS, then TLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
