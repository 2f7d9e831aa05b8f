//! Delivery status notifications (RFC 3464): the bounce a sender gets for
//! recipients that failed for good, and the success report it asked for
//! with NOTIFY=SUCCESS (RFC 3461). A DSN goes from the null sender `<>`,
//! so it can never cause another; none is ever sent to `<>`.

use correu_proto::v1::{QueuedMessage, Recipient};
use correu_smtp::headers::{field_value, rfc5322_date};

use crate::outcome::Failure;

/// What became of one recipient, as a DSN reports it (RFC 3464 §2.3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Failed(Failure),
    /// Still being retried (a delay warning).
    Delayed(Failure),
    Delivered,
    Relayed {
        remote_mta: String,
    },
}

impl Action {
    /// The action as RFC 3464 names it (and the `action` metric label).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Failed(_) => "failed",
            Action::Delayed(_) => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed { .. } => "relayed",
        }
    }
}

/// Whether the recipient's NOTIFY asks for a report of this action
/// (RFC 3461 §4.1: no NOTIFY means FAILURE, DELAY by the server's choice).
pub fn wanted(notify: &str, action: &Action) -> bool {
    let has = |w: &str| notify.split(',').any(|n| n.eq_ignore_ascii_case(w));
    match action {
        Action::Failed(_) => notify.is_empty() || has("FAILURE"),
        Action::Delayed(_) => notify.is_empty() || has("DELAY"),
        Action::Delivered | Action::Relayed { .. } => has("SUCCESS"),
    }
}

pub use correu_smtp::command::decode_xtext;

/// Largest original message returned whole when RET is not given.
const RETURN_WHOLE_UP_TO: usize = 64 * 1024;

/// The DSN for `original`, or `None` when it goes nowhere (null sender, or
/// no recipient wants one). `new_id` is the DSN's own queue id.
pub fn build(
    reporting_mta: &str,
    original: &QueuedMessage,
    reports: &[(&Recipient, Action)],
    new_id: &str,
    now_unix_micros: i64,
) -> Option<QueuedMessage> {
    if original.sender.is_empty() {
        return None;
    }
    let reports: Vec<&(&Recipient, Action)> = reports
        .iter()
        .filter(|(r, a)| wanted(&r.notify, a))
        .collect();
    if reports.is_empty() {
        return None;
    }
    let failed = reports.iter().any(|(_, a)| matches!(a, Action::Failed(_)));
    let delayed = !failed && reports.iter().any(|(_, a)| matches!(a, Action::Delayed(_)));
    let now = now_unix_micros / 1_000_000;
    let boundary = format!("{new_id}/{reporting_mta}");
    let subject = if failed {
        "Undelivered Mail Returned to Sender"
    } else if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\nTo: <{sender}>\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <{new_id}@{reporting_mta}>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        sender = field_value(&original.sender),
        date = rfc5322_date(now),
    ));
    // The human part.
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"));
    m.push_str(&format!(
        "This is the mail system at host {reporting_mta}.\r\n\r\n"
    ));
    if failed {
        m.push_str("Your message could not be delivered to one or more recipients.\r\nIt is attached below.\r\n\r\n");
    } else if delayed {
        m.push_str("Your message could not be delivered yet to the recipients below.\r\nIt will be tried again; you need not send it again.\r\n\r\n");
    } else {
        m.push_str("Your message was delivered to the recipients below, as you asked.\r\n\r\n");
    }
    for (r, a) in &reports {
        match a {
            Action::Failed(f) | Action::Delayed(f) => m.push_str(&format!(
                "<{}>: {}\r\n",
                field_value(&r.address),
                field_value(&f.text)
            )),
            Action::Delivered => m.push_str(&format!(
                "<{}>: delivered to the mailbox\r\n",
                field_value(&r.address)
            )),
            Action::Relayed { remote_mta } => m.push_str(&format!(
                "<{}>: relayed to {}\r\n",
                field_value(&r.address),
                field_value(remote_mta)
            )),
        }
    }
    // The machine-readable part (RFC 3464 §2).
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!(
        "Reporting-MTA: dns; {reporting_mta}\r\nX-Correu-Queue-ID: {}\r\n",
        original.queue_id
    ));
    if !original.dsn_envid.is_empty() {
        m.push_str(&format!(
            "Original-Envelope-Id: {}\r\n",
            field_value(&decode_xtext(&original.dsn_envid))
        ));
    }
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.received_at_unix_micros / 1_000_000)
    ));
    for (r, a) in &reports {
        m.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\n",
            field_value(&r.address)
        ));
        if let Some((kind, addr)) = r.orcpt.split_once(';') {
            m.push_str(&format!(
                "Original-Recipient: {}; {}\r\n",
                field_value(kind),
                field_value(&decode_xtext(addr))
            ));
        }
        match a {
            Action::Failed(f) | Action::Delayed(f) => {
                let action = if matches!(a, Action::Failed(_)) {
                    "failed"
                } else {
                    "delayed"
                };
                m.push_str(&format!("Action: {action}\r\nStatus: {}\r\n", f.status));
                if let Some(mta) = &f.remote_mta {
                    m.push_str(&format!("Remote-MTA: dns; {}\r\n", field_value(mta)));
                }
                match &f.smtp_reply {
                    Some(reply) => m.push_str(&format!(
                        "Diagnostic-Code: smtp; {}\r\n",
                        field_value(reply)
                    )),
                    None => m.push_str(&format!(
                        "Diagnostic-Code: X-Correu; {}\r\n",
                        field_value(&f.text)
                    )),
                }
            }
            Action::Delivered => m.push_str("Action: delivered\r\nStatus: 2.0.0\r\n"),
            Action::Relayed { remote_mta } => m.push_str(&format!(
                "Action: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; {}\r\n",
                field_value(remote_mta)
            )),
        }
    }
    // The original: whole, or its headers (RET, RFC 3461 §4.3).
    let content = String::from_utf8_lossy(&original.content);
    // A delay warning never returns the whole message: it is not lost.
    let headers_only = match original.dsn_ret.as_str() {
        _ if delayed => true,
        // The sender asked that the content travel only over verified TLS
        // (RFC 8689 §5); the bounce goes as any mail, so without it.
        _ if original.requiretls => true,
        "HDRS" => true,
        "FULL" => false,
        _ => !failed || original.content.len() > RETURN_WHOLE_UP_TO,
    };
    if headers_only {
        let head = content.split("\r\n\r\n").next().unwrap_or("");
        m.push_str(&format!(
            "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n{head}\r\n"
        ));
    } else {
        m.push_str(&format!(
            "\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n{content}"
        ));
        if !content.ends_with("\r\n") {
            m.push_str("\r\n");
        }
    }
    m.push_str(&format!("\r\n--{boundary}--\r\n"));
    Some(QueuedMessage {
        queue_id: new_id.to_string(),
        sender: String::new(),
        recipients: vec![Recipient {
            address: original.sender.clone(),
            ..Recipient::default()
        }],
        received_at_unix_micros: now_unix_micros,
        content: m.into_bytes(),
        smtputf8: original.smtputf8,
        ..QueuedMessage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original(sender: &str, ret: &str) -> QueuedMessage {
        QueuedMessage {
            queue_id: "1K1AH7X1HXN6Q0Y23".into(),
            sender: sender.into(),
            content: b"Subject: hello\r\nFrom: jo@domini.com\r\n\r\nthe body\r\n".to_vec(),
            received_at_unix_micros: 1_795_863_381_000_000,
            dsn_ret: ret.into(),
            dsn_envid: "QQ+2B1".into(),
            ..QueuedMessage::default()
        }
    }

    fn rcpt(address: &str, notify: &str) -> Recipient {
        Recipient {
            address: address.into(),
            notify: notify.into(),
            orcpt: format!("rfc822;{}", address.replace('@', "+40")),
            ..Recipient::default()
        }
    }

    fn failed() -> Action {
        Action::Failed(Failure {
            status: "5.1.1".into(),
            text: "mx.test said: 550 5.1.1 no such user".into(),
            remote_mta: Some("mx.test".into()),
            smtp_reply: Some("550 5.1.1 no such user".into()),
            suppressed: false,
        })
    }

    /// A queued envelope whose ENVID or ORCPT decodes to CR LF (one from
    /// before the parser refused them, or from another producer) still
    /// cannot write a line into the report.
    #[test]
    fn envelope_values_cannot_add_lines_to_a_report() {
        let msg = QueuedMessage {
            queue_id: "Q1".into(),
            sender: "jo@domini.com".into(),
            dsn_envid: "x+0D+0ABcc:+20evil@example".into(),
            content: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            ..Default::default()
        };
        let r = Recipient {
            address: "ana@remote.test".into(),
            orcpt: "rfc822;ana@remote.test+0D+0AX-Injected:+20yes".into(),
            ..Default::default()
        };
        let failure = Failure {
            status: "5.1.1".into(),
            text: "no such user\r\nX-Also: injected".into(),
            remote_mta: Some("mx.remote.test".into()),
            smtp_reply: Some("550 5.1.1 no\rX-Third: injected".into()),
            suppressed: false,
        };
        let dsn = build("mx.test", &msg, &[(&r, Action::Failed(failure))], "Q2", 0).unwrap();
        let text = String::from_utf8(dsn.content).unwrap();
        for line in text.split("\r\n") {
            assert!(!line.starts_with("Bcc:"), "{line}");
            assert!(!line.starts_with("X-Injected"), "{line}");
            assert!(!line.starts_with("X-Also"), "{line}");
            assert!(!line.contains('\r'), "{line:?}");
        }
        assert!(
            text.contains("Original-Envelope-Id: x??Bcc: evil@example\r\n"),
            "{text}"
        );
    }

    #[test]
    fn a_bounce_has_the_rfc_3464_parts() {
        let o = original("jo@domini.com", "");
        let a = rcpt("ana@remote.test", "");
        let dsn = build(
            "mx.example.org",
            &o,
            &[(&a, failed())],
            "1K1AH7X1HXN6Q0Y99",
            1_795_863_400_000_000,
        )
        .unwrap();
        assert_eq!(dsn.sender, "");
        assert_eq!(dsn.recipients[0].address, "jo@domini.com");
        let text = String::from_utf8(dsn.content).unwrap();
        for want in [
            "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;",
            "Auto-Submitted: auto-replied\r\n",
            "Reporting-MTA: dns; mx.example.org\r\n",
            "Original-Envelope-Id: QQ+1\r\n",
            "Final-Recipient: rfc822; ana@remote.test\r\n",
            "Original-Recipient: rfc822; ana@remote.test\r\n",
            "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.test\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n",
            "Content-Type: message/rfc822\r\n\r\nSubject: hello\r\n",
            "the body\r\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.trim_end().ends_with("--"));
    }

    #[test]
    fn ret_hdrs_returns_only_the_headers() {
        let o = original("jo@domini.com", "HDRS");
        let a = rcpt("ana@remote.test", "FAILURE");
        let text =
            String::from_utf8(build("mx", &o, &[(&a, failed())], "X", 0).unwrap().content).unwrap();
        assert!(text.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: jo@domini.com\r\n"
        ));
        assert!(!text.contains("the body"));
        // A REQUIRETLS message's bounce never carries its body, whatever
        // RET says (RFC 8689 §5).
        let o = QueuedMessage {
            requiretls: true,
            ..original("jo@domini.com", "FULL")
        };
        let text =
            String::from_utf8(build("mx", &o, &[(&a, failed())], "X", 0).unwrap().content).unwrap();
        assert!(text.contains("Content-Type: text/rfc822-headers") && !text.contains("the body"));
    }

    #[test]
    fn notify_and_the_null_sender_decide_whether_one_is_sent() {
        let o = original("jo@domini.com", "");
        let never = rcpt("a@x.test", "NEVER");
        let delay = rcpt("b@x.test", "DELAY");
        let success = rcpt("c@x.test", "SUCCESS");
        assert!(build("mx", &o, &[(&never, failed())], "X", 0).is_none());
        assert!(build("mx", &o, &[(&delay, failed())], "X", 0).is_none());
        assert!(build("mx", &o, &[(&success, failed())], "X", 0).is_none());
        assert!(build("mx", &o, &[(&success, Action::Delivered)], "X", 0).is_some());
        assert!(build("mx", &o, &[(&never, Action::Delivered)], "X", 0).is_none());
        // Never a bounce to <>.
        let bounce = original("", "");
        assert!(build("mx", &bounce, &[(&rcpt("a@x.test", ""), failed())], "X", 0).is_none());
        assert_eq!(decode_xtext("a+2Bb+3Dc"), "a+b=c");
        // Delay warnings: only for NOTIFY unset or with DELAY; headers only.
        let delayed = Action::Delayed(Failure {
            status: "4.4.1".into(),
            text: "connection refused".into(),
            remote_mta: None,
            smtp_reply: None,
            suppressed: false,
        });
        assert!(build("mx", &o, &[(&never, delayed.clone())], "X", 0).is_none());
        let warning = build("mx", &o, &[(&delay, delayed)], "X", 0).unwrap();
        let text = String::from_utf8(warning.content).unwrap();
        assert!(text.contains("Subject: Delayed Mail (still being retried)"));
        assert!(text.contains("Action: delayed\r\nStatus: 4.4.1\r\n"));
        assert!(text.contains("Content-Type: text/rfc822-headers") && !text.contains("the body"));
    }
}
