//! The `Received:` field from any client-given values (HELO, TLS text,
//! authenticated user, recipient): it is always its own lines, a first
//! line that names it and folded lines after, and nothing the client sent
//! can end it early or start another field.
#![no_main]
use std::net::{IpAddr, Ipv6Addr};

use correu_smtp::Address;
use correu_smtp::command::{MailParams, ReversePath};
use correu_smtp::headers::received;
use correu_smtp::session::{Envelope, Rcpt};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Option<String>, Option<String>, String, [u8; 16], i64)| {
    let (helo, tls, user, rcpt, ip, now) = input;
    let recipients = Address::parse(&rcpt)
        .map(|address| {
            vec![Rcpt {
                address,
                params: Default::default(),
                forward: None,
            }]
        })
        .unwrap_or_default();
    let env = Envelope {
        helo,
        from: ReversePath::Null,
        params: MailParams::default(),
        recipients,
        protocol: "ESMTPS",
        tls,
        user,
    };
    let field = received(
        &env,
        IpAddr::V6(Ipv6Addr::from(ip)),
        "mx.example",
        "QID",
        now.rem_euclid(1 << 40),
    );
    let body = field.strip_suffix("\r\n").expect("ends the field with CRLF");
    let mut lines = body.split("\r\n");
    assert!(lines.next().is_some_and(|l| l.starts_with("Received: from ")));
    for l in lines {
        assert!(l.starts_with('\t'), "a folded line: {l:?}");
    }
    assert!(
        !body.chars().any(|c| c.is_control() && c != '\r' && c != '\n' && c != '\t'),
        "no other control characters"
    );
    assert_eq!(body.matches('\r').count(), body.matches("\r\n").count());
    assert_eq!(body.matches('\n').count(), body.matches("\r\n").count());
});
