//! Any sequence of lines through the session machine, with every outside
//! answer chosen by the input: no panic, and every step is well formed.
#![no_main]
use std::sync::Arc;

use correu_smtp::session::{
    BodyReport, Chunked, CredentialVerdict, Policy, RecipientVerdict, Role, Session, SessionConfig, Step,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, Vec<Vec<u8>>)| {
    let (flags, lines) = input;
    let cfg = Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        local_domains: vec!["localhost".into()],
        max_message_size: 1000,
        max_recipients: 3,
        max_errors: 50,
        max_transactions: 5,
        max_text_line: 1000,
        reject_bare_line_ends: flags & 1 == 1,
        max_hops: 3,
    });
    let role = [Role::Mx, Role::Submission, Role::Submissions][usize::from(flags >> 1) % 3];
    let policy = Policy {
        role,
        tls_available: flags & 8 != 0,
        tls_active: role == Role::Submissions,
        auth_available: flags & 16 != 0,
        relay_allowed: flags & 32 != 0,
    };
    let mut s = Session::new(cfg, policy);
    for (i, line) in lines.iter().enumerate() {
        let mut step = s.command(line);
        loop {
            step = match step {
                Step::CheckRecipient(a) => s.recipient_checked(a, [RecipientVerdict::Exists, RecipientVerdict::Unknown, RecipientVerdict::TryLater][i % 3].clone()),
                Step::CheckCredentials { user, .. } => s.credentials_checked(user, [CredentialVerdict::Valid, CredentialVerdict::Invalid, CredentialVerdict::TryLater][i % 3]),
                Step::StartTls(_) => {
                    s.tls_started("TLS".into());
                    break;
                }
                Step::Data(r) => {
                    assert_eq!(r.code, 354);
                    match s.data_received(BodyReport { longest_line: i * 100, hops: i, ..BodyReport::default() }) {
                        Ok(_) => {
                            s.queued(Ok("ID"));
                        }
                        Err(r) => assert!(r.code >= 400),
                    }
                    break;
                }
                Step::Chunk { size, last, .. } => match s.chunk_received(size, last.then(|| BodyReport { hops: i, ..BodyReport::default() })) {
                    Chunked::Step(st) => st,
                    Chunked::Queue(_) => {
                        s.queued(Ok("ID"));
                        break;
                    }
                },
                Step::Reply(r) => {
                    assert!((200..600).contains(&r.code));
                    break;
                }
                Step::Close(_) => return,
            };
        }
    }
});
