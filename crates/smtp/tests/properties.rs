//! Properties of the protocol code over arbitrary input (proptest).

use correu_smtp::command::parse_command;
use correu_smtp::data::{DataReceiver, Progress, dot_stuff};
use correu_smtp::reply::parse_reply;
use correu_smtp::session::{Policy, RecipientVerdict, Session, SessionConfig, Step};
use proptest::prelude::*;

/// Bodies as a mailbox holds them: any octets, lines ending in CRLF.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b".x".to_vec()),
        prop::collection::vec(
            any::<u8>().prop_filter("no line ends", |b| *b != b'\r' && *b != b'\n'),
            0..40
        ),
    ];
    prop::collection::vec(line, 0..30).prop_map(|lines| {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(b"\r\n");
        }
        out
    })
}

proptest! {
    /// What the client sends (dot-stuffed, in any chunks) is what is stored.
    #[test]
    fn data_round_trips_in_any_chunking(body in body(), cuts in prop::collection::vec(1usize..64, 0..20)) {
        let mut wire = Vec::new();
        dot_stuff(&body, &mut wire);
        wire.extend_from_slice(b"QUIT\r\n");
        let mut rx = DataReceiver::new(1 << 20);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut cuts = cuts.into_iter();
        let end = loop {
            let n = cuts.next().unwrap_or(wire.len()).min(wire.len() - pos);
            match rx.feed(&wire[pos..pos + n], &mut out) {
                Progress::Done(used) => break pos + used,
                Progress::More => pos += n,
            }
            prop_assert!(pos < wire.len(), "never ended");
        };
        prop_assert_eq!(&wire[end..], b"QUIT\r\n");
        prop_assert_eq!(out, body);
        prop_assert_eq!(rx.report().bare_line_ends, 0);
    }

    /// No input makes the receiver panic, and it ends exactly at the first
    /// CRLF.CRLF (the stream starts at a line start, after DATA's CRLF).
    #[test]
    fn data_receiver_ends_only_at_crlf_dot_crlf(bytes in prop::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..400)) {
        let mut rx = DataReceiver::new(100);
        let mut out = Vec::new();
        let mut wire = b"\r\n".to_vec();
        wire.extend_from_slice(&bytes);
        let first = wire.windows(5).position(|w| w == b"\r\n.\r\n").map(|p| p + 3);
        match rx.feed(&bytes, &mut out) {
            Progress::Done(n) => prop_assert_eq!(Some(n), first),
            Progress::More => prop_assert_eq!(None, first),
        }
    }

    #[test]
    fn command_parser_never_panics(line in prop::collection::vec(any::<u8>(), 0..600)) {
        let _parsed = parse_command(&line);
    }

    #[test]
    fn reply_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _parsed = parse_reply(&bytes);
    }

    /// Whatever a client sends, every reply is printable ASCII lines ending
    /// in CRLF (an echoed address or a stray byte never reaches the wire
    /// as it came).
    #[test]
    fn replies_are_ascii_whatever_the_client_sends(
        lines in prop::collection::vec(
            prop_oneof![
                Just(b"EHLO client.example".to_vec()),
                Just(b"MAIL FROM:<jo@domini.com> SMTPUTF8".to_vec()),
                Just("RCPT TO:<ànna@localhost>".as_bytes().to_vec()),
                Just("RCPT TO:<ànna@elsewhere.example>".as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 0..80),
                prop::collection::vec(any::<u8>(), 0..80).prop_map(|mut v| {
                    let mut l = b"RCPT TO:<".to_vec();
                    l.append(&mut v);
                    l.extend_from_slice(b"@localhost>");
                    l
                }),
            ],
            1..12,
        )
    ) {
        let cfg = std::sync::Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            local_domains: vec!["localhost".into()],
            max_message_size: 1000,
            max_recipients: 5,
            max_errors: 100,
            max_transactions: 3,
            max_text_line: 1000,
            reject_bare_line_ends: false,
            max_hops: 3,
        });
        let mut s = Session::new(cfg, Policy::mx(true));
        let mut replies = vec![s.greeting()];
        'lines: for line in lines {
            let mut step = s.command(&line);
            loop {
                match step {
                    Step::CheckRecipient(to) => {
                        step = s.recipient_checked(to, RecipientVerdict::Unknown);
                        continue;
                    }
                    Step::Reply(r) => replies.push(r),
                    // The session now expects a message, TLS or a password,
                    // not commands: this run ends here.
                    Step::Close(r) | Step::Data(r) | Step::StartTls(r) => {
                        replies.push(r);
                        break 'lines;
                    }
                    _ => break 'lines,
                }
                break;
            }
        }
        for r in replies {
            let wire = r.to_bytes();
            let text = wire.strip_suffix(b"\r\n").unwrap_or(&wire);
            prop_assert!(
                text.split(|b| *b == b'\n').all(|l| l.strip_suffix(b"\r").unwrap_or(l).iter().all(|b| (b' '..=b'~').contains(b))),
                "not printable ASCII: {:?}", String::from_utf8_lossy(&wire)
            );
        }
    }
}
