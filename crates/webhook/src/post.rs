//! The webhook's signed POST of one event ([`correu_delivery::http`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use correu_delivery::http::{PostError, Target};
use tokio_rustls::TlsConnector;

/// The value of `Correu-Signature` for `body` at `t` (Unix seconds):
/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. The receiver
/// recomputes it, compares in constant time, and refuses an old `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let t_text = t.to_string();
    let mac = correu_smtp::srs::hmac_sha256(secret, &[t_text.as_bytes(), b".", body]);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Posts events: one connection per POST (events are few per second per
/// process, and a fresh connection never meets a half-closed one).
pub struct Poster {
    tls: TlsConnector,
    secret: Option<Vec<u8>>,
    timeout: Duration,
}

impl Poster {
    pub fn new(tls: TlsConnector, secret: Option<Vec<u8>>, timeout: Duration) -> Poster {
        Poster {
            tls,
            secret,
            timeout,
        }
    }

    /// Whether posts carry `Correu-Signature`.
    pub fn signs(&self) -> bool {
        self.secret.is_some()
    }

    /// POSTs `body` (the event `id`) to `t`; `Ok` on a 2xx answer.
    pub async fn post(&self, t: &Target, id: &str, body: &Bytes) -> Result<(), PostError> {
        let mut headers = vec![
            ("Content-Type", "application/json".to_string()),
            ("Correu-Event-Id", id.to_string()),
        ];
        if let Some(secret) = &self.secret {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            headers.push(("Correu-Signature", signature(secret, now, body)));
        }
        correu_delivery::http::post(&self.tls, t, &headers, body.clone(), self.timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // Independent value: python3 -c 'import hmac,hashlib;
        // print(hmac.new(b"s3cret", b"1700000000.{}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"s3cret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=97926816e98fbb41ccb1673225ff29a2f35369099990e1b1561651e7bd097ebf"
        );
    }
}
