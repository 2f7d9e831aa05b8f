//! What happened to one recipient, decided in one place, with what a
//! delivery status notification needs to say about it (RFC 3464).

use std::fmt;

use correu_smtp::Reply;

/// Why a recipient was not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The enhanced status code (RFC 3463), like `5.1.1`.
    pub status: String,
    /// What went wrong, for logs and the human part of a bounce.
    pub text: String,
    /// The host that answered, when one did.
    pub remote_mta: Option<String>,
    /// The SMTP reply as received, for the bounce's Diagnostic-Code.
    pub smtp_reply: Option<String>,
    /// Not attempted: the recipient is on the suppression list.
    pub suppressed: bool,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

impl Failure {
    /// What kind of failure it was ([`classify`]).
    pub fn class(&self) -> &'static str {
        if self.suppressed {
            return "suppressed";
        }
        classify(
            &self.status,
            self.smtp_reply.as_deref().unwrap_or(&self.text),
        )
    }
}

/// The bounce class of a failure (`delivery.suppression.classes`, events,
/// the log line), from its enhanced status code (RFC 3463) first and the
/// words of the reply where the code is generic (`5.0.0`, `5.7.1`), as
/// receivers write them: Gmail's `5.7.1 ... spam`, Exchange's `5.2.2
/// mailbox full`, Postfix's `550 5.1.1 User unknown`.
pub fn classify(status: &str, reply: &str) -> &'static str {
    let text = reply.to_ascii_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let mut parts = status.splitn(3, '.');
    let (_class, subject, detail) = (parts.next(), parts.next(), parts.next());
    let by_code = match (subject, detail) {
        (Some("1"), Some("1" | "0" | "3" | "6")) => Some("invalid_recipient"),
        // The sender's address (bad sender, sender syntax): not the
        // recipient's fault, never a reason to suppress it.
        (Some("1"), Some("7" | "8")) => Some("policy"),
        (Some("1"), Some("2" | "10")) => Some("dns"),
        (Some("2"), Some("1")) => Some("invalid_recipient"),
        (Some("2"), Some("2")) => Some("mailbox_full"),
        (Some("2"), Some("3")) | (Some("3"), Some("4")) => Some("message_too_large"),
        (Some("4"), Some("4")) => Some("dns"),
        (Some("4"), Some("1" | "2" | "7")) => Some("connection"),
        (Some("4"), Some("5")) => Some("rate_limited"),
        (Some("7"), Some("5" | "10" | "30")) => Some("tls"),
        _ => None,
    };
    if let Some(c) = by_code {
        return c;
    }
    // A refusal of the sender (Postfix's "Sender address rejected: ...
    // User unknown") is about the sender, whatever words follow.
    if says(&["sender address rejected", "sender rejected"]) {
        return "policy";
    }
    // Not "try again later": every greylister and flaky server says it
    // (aiosmtpd's and Postfix's "451 4.3.0 Try again later"), and a rate
    // limit class holds the whole destination off.
    if says(&[
        "rate limit",
        "too many",
        "throttl",
        // Postfix's anvil: "450 4.7.1 Error: too much mail from 192.0.2.1".
        "too much mail",
        "slow down",
    ]) {
        "rate_limited"
    } else if says(&[
        "spam",
        "junk",
        "bulk mail",
        "reputation",
        "blacklist",
        "blocklist",
        "listed",
    ]) {
        "spam"
    } else if says(&[
        "user unknown",
        "no such user",
        "unknown user",
        "does not exist",
        "mailbox unavailable",
        "invalid recipient",
        "no mailbox",
    ]) {
        "invalid_recipient"
    } else if says(&[
        "mailbox full",
        "over quota",
        "quota exceeded",
        "insufficient storage",
    ]) {
        "mailbox_full"
    } else if says(&["too large", "too big", "size limit"]) {
        "message_too_large"
    } else if status.split('.').nth(1) == Some("7")
        || says(&["policy", "not authorized", "denied", "rejected"])
    {
        "policy"
    } else {
        "other"
    }
}

/// The outcome of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored in a mailbox, or accepted by the next hop with a 2xx.
    Delivered { remote_mta: Option<String> },
    /// Try again later (4xx, network and DNS trouble, storage unavailable).
    Temporary(Failure),
    /// Give up and bounce (5xx, unknown mailbox, null MX).
    Permanent(Failure),
}

impl Outcome {
    pub const LOCAL: Outcome = Outcome::Delivered { remote_mta: None };

    pub fn is_temporary(&self) -> bool {
        matches!(self, Outcome::Temporary(_))
    }

    pub fn is_delivered(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }

    /// The reply code a remote server gave for a failure, when one did
    /// (for spans; a success carries none).
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Outcome::Temporary(f) | Outcome::Permanent(f) => f
                .smtp_reply
                .as_deref()
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse().ok()),
            Outcome::Delivered { .. } => None,
        }
    }

    /// A temporary failure found here, not reported by a remote server.
    pub fn temp(status: &str, text: impl Into<String>) -> Outcome {
        Outcome::Temporary(Failure {
            status: status.into(),
            text: text.into(),
            remote_mta: None,
            smtp_reply: None,
            suppressed: false,
        })
    }

    /// A permanent failure found here.
    pub fn perm(status: &str, text: impl Into<String>) -> Outcome {
        Outcome::Permanent(Failure {
            status: status.into(),
            text: text.into(),
            remote_mta: None,
            smtp_reply: None,
            suppressed: false,
        })
    }
}

/// A remote server's reply (RFC 5321 §4.2.1): 2xx done, 4xx temporary,
/// 5xx permanent. Anything else (a 3xx where a final reply was due) is a
/// protocol error, which is temporary. Without an enhanced code the
/// status is the class's generic one (`4.0.0`, `5.0.0`).
pub fn from_reply(r: &Reply, host: &str) -> Outcome {
    let status = |class: u8| match r.enhanced {
        Some(e) if e.0 == class => e.to_string(),
        _ => format!("{class}.0.0"),
    };
    let failure = |class: u8| Failure {
        status: status(class),
        text: format!("{host} said: {r}"),
        remote_mta: Some(host.to_string()),
        smtp_reply: Some(r.to_string()),
        suppressed: false,
    };
    match r.code {
        200..=299 => Outcome::Delivered {
            remote_mta: Some(host.to_string()),
        },
        400..=499 => Outcome::Temporary(failure(4)),
        500..=599 => Outcome::Permanent(failure(5)),
        _ => Outcome::Temporary(Failure {
            status: "4.5.0".into(),
            text: format!("{host} gave an unexpected reply: {r}"),
            remote_mta: Some(host.to_string()),
            smtp_reply: Some(r.to_string()),
            suppressed: false,
        }),
    }
}

/// A storage gRPC error: the request itself is wrong or names no mailbox
/// (permanent), or storage is unreachable, slow or broken (temporary).
pub fn from_status(s: &tonic::Status) -> Outcome {
    use tonic::Code;
    let text = format!("storage: {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::NotFound => Outcome::perm("5.1.1", text),
        Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied => {
            Outcome::perm("5.3.0", text)
        }
        Code::ResourceExhausted => Outcome::temp("4.2.2", text),
        _ => Outcome::temp("4.3.0", text),
    }
}

/// A session with one host that failed before every recipient had an
/// answer: always temporary (the next host, or the next attempt, may do
/// better), with the status saying what kind of trouble it was.
pub fn from_session_error(
    e: &crate::client::SessionError,
    host: &str,
    addr: std::net::SocketAddr,
) -> Outcome {
    use crate::client::{Phase, SessionError};
    let status = match e {
        // RFC 3463: 4.4.1 no answer from host; 4.4.2 bad connection.
        SessionError::Io(_) | SessionError::Timeout(Phase::Connect, _) => "4.4.1",
        SessionError::TlsHandshake(_) => "4.7.5",
        SessionError::Timeout(..) | SessionError::Closed | SessionError::BadReply(_) => "4.4.2",
        SessionError::Refused(_) => "4.4.1",
        // 4.7.5: cryptographic failure; 4.7.8: credentials refused.
        SessionError::TlsRequired(_) => "4.7.5",
        SessionError::Auth(_) => "4.7.8",
    };
    let reply = match e {
        SessionError::Refused(r) | SessionError::Auth(r) => Some(r.to_string()),
        _ => None,
    };
    Outcome::Temporary(Failure {
        status: status.into(),
        text: format!("{host} ({addr}): {e}"),
        remote_mta: reply.as_ref().map(|_| host.to_string()),
        smtp_reply: reply,
        suppressed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use correu_smtp::Enhanced;

    #[test]
    fn classifies_session_errors_table() {
        use crate::client::{Phase, SessionError};
        use std::time::Duration;
        let addr: std::net::SocketAddr = "192.0.2.1:25".parse().unwrap();
        let refused = Reply::new(554, Enhanced(5, 7, 1), "go away");
        let cases: Vec<(SessionError, &str, &str)> = vec![
            (
                SessionError::Io(std::io::ErrorKind::ConnectionRefused.into()),
                "4.4.1",
                "connection refused",
            ),
            (
                SessionError::Timeout(Phase::Connect, Duration::from_secs(30)),
                "4.4.1",
                "no reply to connect within 30s",
            ),
            (
                SessionError::Timeout(Phase::DataEnd, Duration::from_secs(600)),
                "4.4.2",
                "no reply to data end within 600s",
            ),
            (SessionError::Closed, "4.4.2", "closed by the server"),
            (
                SessionError::Refused(refused.clone()),
                "4.4.1",
                "554 5.7.1 go away",
            ),
            (
                SessionError::TlsRequired("no STARTTLS".into()),
                "4.7.5",
                "TLS required: no STARTTLS",
            ),
            (SessionError::Auth(refused), "4.7.8", "authentication"),
        ];
        for (e, status, says) in cases {
            let o = from_session_error(&e, "mx.test", addr);
            let Outcome::Temporary(f) = &o else {
                panic!("{e}: {o:?} is not temporary")
            };
            assert_eq!(f.status, status, "{e}");
            assert!(f.text.starts_with("mx.test (192.0.2.1:25): "), "{}", f.text);
            assert!(
                f.text.to_lowercase().contains(&says.to_lowercase()),
                "{}",
                f.text
            );
        }
    }

    #[test]
    fn classifies_replies_table() {
        let cases: &[(u16, Option<Enhanced>, &str, &str)] = &[
            (250, None, "delivered", ""),
            (251, None, "delivered", ""),
            (421, Some(Enhanced(4, 3, 2)), "temporary", "4.3.2"),
            (450, None, "temporary", "4.0.0"),
            (452, Some(Enhanced(4, 2, 2)), "temporary", "4.2.2"),
            (354, None, "temporary", "4.5.0"),
            (550, Some(Enhanced(5, 1, 1)), "permanent", "5.1.1"),
            (554, None, "permanent", "5.0.0"),
        ];
        for (code, enh, kind, status) in cases {
            let r = Reply {
                code: *code,
                enhanced: *enh,
                lines: vec!["x".into()],
            };
            let got = from_reply(&r, "mx.test");
            match (&got, *kind) {
                (Outcome::Delivered { remote_mta }, "delivered") => {
                    assert_eq!(remote_mta.as_deref(), Some("mx.test"))
                }
                (Outcome::Temporary(f), "temporary") | (Outcome::Permanent(f), "permanent") => {
                    assert_eq!(f.status, *status, "{code}");
                    assert_eq!(f.remote_mta.as_deref(), Some("mx.test"));
                }
                _ => panic!("{code}: {got:?}, want {kind}"),
            }
        }
        let got = from_reply(
            &Reply::new(550, Enhanced(5, 1, 1), "no such user"),
            "mx.test",
        );
        let Outcome::Permanent(f) = got else { panic!() };
        assert_eq!(f.text, "mx.test said: 550 5.1.1 no such user");
        assert_eq!(f.smtp_reply.as_deref(), Some("550 5.1.1 no such user"));
    }

    #[test]
    fn bounce_classes_table() {
        let cases = [
            (
                "5.1.1",
                "550 5.1.1 <x@y>: Recipient address rejected: User unknown",
                "invalid_recipient",
            ),
            ("5.2.2", "552 5.2.2 mailbox full", "mailbox_full"),
            ("4.2.2", "452 4.2.2 over quota", "mailbox_full"),
            ("5.3.4", "552 5.3.4 message too big", "message_too_large"),
            ("5.7.1", "550 5.7.1 Message rejected as spam", "spam"),
            ("5.7.1", "554 5.7.1 Relay access denied", "policy"),
            (
                "4.7.0",
                "421 4.7.0 Try again later, too many connections",
                "rate_limited",
            ),
            ("4.4.5", "busy", "rate_limited"),
            ("4.3.0", "451 4.3.0 Try again later", "other"),
            (
                "5.1.7",
                "550 5.1.7 <x@y>: Sender address rejected: undeliverable address: User unknown",
                "policy",
            ),
            (
                "5.0.0",
                "550 Sender address rejected: User unknown in local recipient table",
                "policy",
            ),
            (
                "5.7.1",
                "554 5.7.1 <x@y>: Recipient address rejected: Access denied",
                "policy",
            ),
            (
                "4.7.1",
                "450 4.7.1 Error: too much mail from 127.0.0.1",
                "rate_limited",
            ),
            ("5.1.10", "null MX", "dns"),
            ("4.4.4", "no address", "dns"),
            ("4.4.1", "connection refused", "connection"),
            ("4.7.5", "TLS handshake failed", "tls"),
            ("5.0.0", "554 no such user here", "invalid_recipient"),
            ("4.0.0", "451 local error", "other"),
        ];
        for (status, reply, want) in cases {
            assert_eq!(classify(status, reply), want, "{status} {reply}");
        }
    }

    #[test]
    fn classifies_storage_errors_table() {
        use tonic::{Code, Status};
        let cases = [
            (Code::NotFound, false),
            (Code::InvalidArgument, false),
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::ResourceExhausted, true),
            (Code::Internal, true),
            (Code::Unknown, true),
        ];
        for (code, temporary) in cases {
            assert_eq!(
                from_status(&Status::new(code, "x")).is_temporary(),
                temporary,
                "{code:?}"
            );
        }
    }
}
