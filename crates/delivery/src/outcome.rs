//! What happened to one recipient, decided in one place.

use correu_smtp::Reply;

/// The outcome of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored in a mailbox or accepted by the next hop with a 2xx.
    Delivered,
    /// Try again later (4xx, network and DNS trouble, storage unavailable).
    Temporary(String),
    /// Give up and bounce (5xx, unknown mailbox, null MX).
    Permanent(String),
}

impl Outcome {
    pub fn is_temporary(&self) -> bool {
        matches!(self, Outcome::Temporary(_))
    }
}

/// A remote server's reply (RFC 5321 §4.2.1): 2xx done, 4xx temporary,
/// 5xx permanent. Anything else (a 3xx where a final reply was due) is a
/// protocol error, which is temporary.
pub fn from_reply(r: &Reply, host: &str) -> Outcome {
    let text = format!("{host} said: {r}");
    match r.code {
        200..=299 => Outcome::Delivered,
        400..=499 => Outcome::Temporary(text),
        500..=599 => Outcome::Permanent(text),
        _ => Outcome::Temporary(format!("{host} gave an unexpected reply: {r}")),
    }
}

/// A storage gRPC error: the request itself is wrong or names no mailbox
/// (permanent), or storage is unreachable, slow or broken (temporary).
pub fn from_status(s: &tonic::Status) -> Outcome {
    use tonic::Code;
    let text = format!("storage: {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied => Outcome::Permanent(text),
        _ => Outcome::Temporary(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use correu_smtp::Enhanced;

    #[test]
    fn classifies_replies_table() {
        let cases = [
            (250, Outcome::Delivered),
            (251, Outcome::Delivered),
            (421, Outcome::Temporary(String::new())),
            (450, Outcome::Temporary(String::new())),
            (452, Outcome::Temporary(String::new())),
            (354, Outcome::Temporary(String::new())),
            (550, Outcome::Permanent(String::new())),
            (554, Outcome::Permanent(String::new())),
        ];
        for (code, want) in cases {
            let got = from_reply(
                &Reply::new(code, Enhanced((code / 100) as u8, 0, 0), "x"),
                "mx.test",
            );
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{code}"
            );
        }
        let got = from_reply(
            &Reply::new(550, Enhanced(5, 1, 1), "no such user"),
            "mx.test",
        );
        assert_eq!(
            got,
            Outcome::Permanent("mx.test said: 550 5.1.1 no such user".into())
        );
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
