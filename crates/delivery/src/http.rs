//! A small HTTP/1.1 client for what Correu posts: webhook events and TLS
//! reports (`https://` with a verified certificate, one connection per
//! request).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// An `http://` or `https://` URL, split once.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    host: String,
    port: u16,
    /// Path and query, `/` at least.
    path: String,
    tls: bool,
    /// A short hash of the URL, naming it in Redis keys.
    pub key: String,
}

impl Target {
    /// `http://host[:port][/path]` or `https://…` (checked by the
    /// configuration already; this says why one is still wrong).
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}` is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(format!("`{url}`: credentials in a URL are not supported"));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: `{p}` is not a port"))
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, "")) => (h, default_port),
                Some((h, p)) if p.starts_with(':') => (h, port(&p[1..])?),
                _ => return Err(format!("`{url}`: a bad [address]")),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, port(p)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(url.as_bytes());
        Ok(Target {
            url: url.to_string(),
            host: host.to_string(),
            port,
            path,
            tls,
            key: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the request could not be built: {0}")]
    Request(#[from] http::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// POSTs `body` to `t` with `headers` (Host and User-Agent are added),
/// within `timeout`; `Ok` on a 2xx answer.
pub async fn post(
    tls: &TlsConnector,
    t: &Target,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(), PostError> {
    tokio::time::timeout(timeout, post_once(tls, t, headers, body))
        .await
        .map_err(|_| PostError::Timeout(timeout))?
}

async fn post_once(
    tls: &TlsConnector,
    t: &Target,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(), PostError> {
    let addr = format!("{}:{}", t.host, t.port);
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|source| PostError::Connect { addr, source })?;
    // Small requests: no Nagle delay before the last bytes.
    let _ = tcp.set_nodelay(true);
    let mut request = http::Request::post(t.path.as_str())
        .header(http::header::HOST, host_header(t))
        .header(http::header::USER_AGENT, "correu");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request.body(Full::new(body))?;
    let status = if t.tls {
        let name = ServerName::try_from(t.host.clone()).map_err(|e| PostError::Tls {
            host: t.host.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|source| PostError::Tls {
                host: t.host.clone(),
                source,
            })?;
        send(stream, request).await?
    } else {
        send(tcp, request).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status(status))
    }
}

fn host_header(t: &Target) -> String {
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    match (t.tls, t.port) {
        (true, 443) | (false, 80) => host,
        _ => format!("{host}:{}", t.port),
    }
}

async fn send<S>(
    stream: S,
    request: http::Request<Full<Bytes>>,
) -> Result<http::StatusCode, PostError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The (ignored) body is read so the receiver is not cut off mid-answer.
    let (head, _body) = exchange(stream, request, 64 * 1024).await?;
    Ok(head.status)
}

/// A body that could not be read, or passed its limit.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// One request on a new HTTP/1.1 connection over `stream`: the answer's
/// head, and its body up to `limit` bytes. The connection is closed after.
pub async fn exchange<S, B>(
    stream: S,
    request: http::Request<B>,
    limit: usize,
) -> Result<(http::response::Parts, Result<Bytes, BodyError>), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BodyError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let result = async {
        let (head, body) = sender.send_request(request).await?.into_parts();
        let body = http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map(|b| b.to_bytes());
        Ok((head, body))
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_and_without_port_and_path() {
        let t = Target::parse("http://127.0.0.1:8080/hooks/correu?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str(), t.tls),
            ("127.0.0.1", 8080, "/hooks/correu?x=1", false)
        );
        let t = Target::parse("https://hooks.example.com").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str(), t.tls),
            ("hooks.example.com", 443, "/", true)
        );
        let t = Target::parse("http://[::1]:9000/e").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert_eq!(host_header(&t), "[::1]:9000");
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("http://u:p@x/").is_err());
        assert!(Target::parse("http://x:port/").is_err());
        assert_ne!(
            Target::parse("http://a/").unwrap().key,
            Target::parse("http://b/").unwrap().key
        );
    }
}
