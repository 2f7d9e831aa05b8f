//! Any bytes as a PROXY header: the parser answers (a header, "more", or
//! an error) and never panics; a header it accepts is no longer than the
//! input and every shorter prefix of it asks for more; a v1 header built
//! from any addresses parses back to the client's address.
#![no_main]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use correu_smtp::proxy::{Header, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, [u8; 16], [u8; 16], u16, u16, bool)| {
    let (raw, src, dst, sport, dport, v6) = input;
    if let Ok(Some((header, n))) = parse(&raw) {
        assert!(n > 0 && n <= raw.len());
        assert_eq!(parse(&raw[..n]), Ok(Some((header, n))));
        for k in [0, 1, n / 2, n - 1] {
            if k < n {
                assert_eq!(parse(&raw[..k]), Ok(None), "prefix {k} of {n}");
            }
        }
    }
    let (s, d): (IpAddr, IpAddr) = if v6 {
        (Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into())
    } else {
        let four = |b: [u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]).into();
        (four(src), four(dst))
    };
    let family = if v6 { "TCP6" } else { "TCP4" };
    let line = format!("PROXY {family} {s} {d} {sport} {dport}\r\nEHLO x\r\n");
    let want = SocketAddr::new(s, sport);
    match parse(line.as_bytes()) {
        Ok(Some((Header::Proxied(got), n))) => {
            assert_eq!(got, want);
            assert_eq!(&line.as_bytes()[n..], b"EHLO x\r\n");
        }
        other => panic!("{line:?} gave {other:?}"),
    }
});
