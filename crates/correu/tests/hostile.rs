//! Hostile clients against `correu serve`: each offender gets a reply code
//! or a closed connection, and everyone else keeps being served.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

fn serve(dir: &Path, smtp: &str) -> (Proc, SocketAddr) {
    let cfg = dir.join("correu.toml");
    std::fs::write(
        &cfg,
        format!("[smtp]\nlisten = [\"0.0.0.0:0\"]\n{smtp}\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n"),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, "serve", dir, &["serve"], &cfg);
    let addr = p.serve_smtp_addr();
    (p, SocketAddr::from(([127, 0, 0, 1], addr.port())))
}

/// Connects from a chosen loopback address (127.0.0.2 is another client).
fn first_reply(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nonblocking(false).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn a_normal_client_is_served(addr: SocketAddr, src: [u8; 4]) {
    let mut s = connect_from(src, addr);
    assert!(first_reply(&mut s).starts_with("220 "));
    s.write_all(
        b"EHLO normal\r\nMAIL FROM:<jo@domini.com>\r\nRCPT TO:<pere@localhost>\r\nDATA\r\n",
    )
    .unwrap();
    let mut c = Smtp::from_stream(s);
    for want in [250, 250, 250, 354] {
        assert_eq!(c.read().code, want);
    }
    c.send(b"Subject: still here\r\n\r\nok\r\n.\r\n");
    assert_eq!(c.read().code, 250);
}

#[test]
fn one_address_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(
        dir.path(),
        "trusted_networks = []\nmax_connections_per_client = 5",
    );
    let mut idle: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 1], addr);
            assert!(first_reply(&mut s).starts_with("220 "));
            s
        })
        .collect();
    let mut sixth = connect_from([127, 0, 0, 1], addr);
    assert!(
        first_reply(&mut sixth).starts_with("421 4.7.0"),
        "the sixth is refused"
    );
    a_normal_client_is_served(addr, [127, 0, 0, 2]);
    idle.truncate(4);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = connect_from([127, 0, 0, 1], addr);
    assert!(
        first_reply(&mut again).starts_with("220 "),
        "a freed slot is usable"
    );
}

/// Writes `bytes` one at a time, `every` apart, and returns what the server
/// said until it closed (or `give_up` passed).
fn drip(s: &mut TcpStream, bytes: &[u8], every: Duration, give_up: Duration) -> String {
    s.set_read_timeout(Some(every)).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    for b in bytes.iter().cycle() {
        if started.elapsed() > give_up || s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn slow_clients_meet_the_command_data_and_session_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(
        dir.path(),
        "command_timeout = \"1s\"\ndata_timeout = \"1s\"\nmin_data_rate = 100\nmax_session_time = \"4s\"",
    );
    // Silent after the greeting: 421 4.4.2 after the command timeout.
    let mut silent = connect_from([127, 0, 0, 1], addr);
    first_reply(&mut silent);
    let started = Instant::now();
    let r = first_reply(&mut silent);
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A byte every 200 ms: each byte is "activity", but no command line
    // is whole within the command timeout, so the command times out
    // (before this was fixed, only the session deadline ended it).
    let mut slow = connect_from([127, 0, 0, 1], addr);
    first_reply(&mut slow);
    let started = Instant::now();
    let text = drip(
        &mut slow,
        b"NOOP and more and more\r\n",
        Duration::from_millis(200),
        Duration::from_secs(8),
    );
    assert!(
        text.contains("421 4.4.2") && text.contains("timeout exceeded"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // The same drip inside DATA: 5 octets/s is under min_data_rate, so
    // the transfer ends about data_timeout after the 354.
    let mut data = connect_from([127, 0, 0, 1], addr);
    first_reply(&mut data);
    data.write_all(
        b"HELO drip\r\nMAIL FROM:<jo@domini.com>\r\nRCPT TO:<pere@localhost>\r\nDATA\r\n",
    )
    .unwrap();
    let mut c = Smtp::from_stream(data);
    for want in [250, 250, 250, 354] {
        assert_eq!(c.read().code, want);
    }
    let mut data = c.into_stream();
    let started = Instant::now();
    let text = drip(
        &mut data,
        b"Subject: slow\r\n\r\nslow body\r\n",
        Duration::from_millis(200),
        Duration::from_secs(8),
    );
    assert!(text.contains("421 4.4.2"), "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // Whole commands, each in time (a NOOP every 300 ms): the session
    // deadline ends it.
    let mut chatty = connect_from([127, 0, 0, 1], addr);
    first_reply(&mut chatty);
    let started = Instant::now();
    let text = drip(
        &mut chatty,
        b"NOOP\r\n",
        Duration::from_millis(50),
        Duration::from_secs(8),
    );
    assert!(text.contains("250 2.0.0"), "{text}");
    assert!(
        text.contains("421 4.4.2") && text.contains("session time limit"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[test]
fn when_every_slot_is_taken_the_idlest_session_gives_way() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(dir.path(), "trusted_networks = []\nmax_connections = 4");
    // The oldest session is in the middle of a message: never idle.
    let mut busy = Smtp::connect(addr);
    busy.read();
    busy.cmd("EHLO busy.example");
    assert_eq!(busy.cmd("MAIL FROM:<jo@domini.com>").code, 250);
    assert_eq!(busy.cmd("RCPT TO:<pere@localhost>").code, 250);
    assert_eq!(busy.cmd("DATA").code, 354);
    busy.send(b"Subject: slow writer\r\n");
    std::thread::sleep(Duration::from_millis(200));
    // Three idle ones after it; the first of them is the idlest.
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 1], addr);
            assert!(first_reply(&mut s).starts_with("220 "));
            std::thread::sleep(Duration::from_millis(100));
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1200));

    // Every slot is taken; a new client is served all the same.
    let mut new = connect_from([127, 0, 0, 2], addr);
    let r = first_reply(&mut new);
    assert!(r.starts_with("220 "), "{r}");
    let r = first_reply(&mut idle[0]);
    assert!(
        r.starts_with("421 4.4.2") && r.contains("idle too long"),
        "{r}"
    );
    // The others and the message in progress are untouched.
    for s in &mut idle[1..] {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(s.read(&mut buf).is_err(), "still open, nothing said");
    }
    busy.send(b"\r\nstill coming\r\n.\r\n");
    assert_eq!(busy.read().code, 250);
    drop((busy, idle, new));
    std::thread::sleep(Duration::from_millis(300));

    // Four fresh sessions, none idle for long: the fifth is refused.
    let _fresh: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 1], addr);
            assert!(first_reply(&mut s).starts_with("220 "));
            s
        })
        .collect();
    let mut fifth = connect_from([127, 0, 0, 2], addr);
    let r = first_reply(&mut fifth);
    assert!(r.starts_with("421 4.3.2"), "{r}");
}

#[test]
fn garbage_huge_lines_and_tls_floods_leave_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let TestCert { cert, key, .. } = test_cert(dir.path(), "c");
    let (_p, addr) = serve(
        dir.path(),
        &format!(
            "tls_certificate = \"{}\"\ntls_key = \"{}\"\ntls_handshake_timeout = \"2s\"",
            cert.display(),
            key.display()
        ),
    );
    // A megabyte without a line end: one 500, then the session goes on.
    let mut big = Smtp::connect(addr);
    big.read();
    big.send(&vec![b'A'; 1 << 20]);
    big.send(b"\r\nNOOP\r\n");
    assert!(big.read().to_string().starts_with("500 5.5.2"));
    assert!(big.read().to_string().starts_with("250 2.0.0"));

    // Random bytes and NULs: answered, then the door after 20 errors.
    let mut noise = Smtp::connect(addr);
    noise.read();
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..65536)
        .map(|i| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if i % 50 == 49 { b'\n' } else { (x >> 16) as u8 }
        })
        .collect();
    noise.send(&junk);
    let mut codes = Vec::new();
    loop {
        let r = noise.read();
        codes.push(r.code);
        if r.code == 421 {
            break;
        }
        assert!(codes.len() < 100);
    }
    assert!(
        codes[..codes.len() - 1]
            .iter()
            .all(|c| *c == 500 || *c == 501 || *c == 503),
        "{codes:?}"
    );
    assert!(noise.closed());

    // STARTTLS then garbage instead of a handshake, fifty times over.
    for _ in 0..50 {
        let mut t = Smtp::connect(addr);
        t.read();
        t.cmd("EHLO flood");
        assert_eq!(t.cmd("STARTTLS").code, 220);
        t.send(b"this is not a TLS ClientHello\r\n\r\n");
        assert!(t.drain_until_closed());
    }
    // STARTTLS then nothing: the handshake times out and the slot frees.
    let mut stuck = Smtp::connect(addr);
    stuck.read();
    stuck.cmd("EHLO stuck");
    assert_eq!(stuck.cmd("STARTTLS").code, 220);
    let started = Instant::now();
    assert!(stuck.drain_until_closed());
    assert!(started.elapsed() < Duration::from_secs(5));

    a_normal_client_is_served(addr, [127, 0, 0, 1]);
}

#[test]
fn hundreds_of_idle_connections_do_not_stall_a_working_client() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(dir.path(), "max_connections = 2000");
    let idle: Vec<TcpStream> = (0..600)
        .map(|_| connect_from([127, 0, 0, 1], addr))
        .collect();
    a_normal_client_is_served(addr, [127, 0, 0, 1]);
    drop(idle);
}

/// Nothing a client sends can add a header line to what Correu writes:
/// a bare CR or NUL in HELO/EHLO is refused, so is xtext (ENVID, ORCPT)
/// that decodes to CR LF; the session goes on, and the message that is
/// finally sent carries a `Received:` with the clean name only.
#[test]
fn header_injection_is_refused_at_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(dir.path(), "");
    let mut c = Smtp::connect(addr);
    assert_eq!(c.read().code, 220);
    for evil in [
        "EHLO evil\rX-Injected: cr",
        "HELO evil\0nul",
        "EHLO evil\x0bvt",
    ] {
        let r = c.cmd(evil);
        assert_eq!(
            (r.code, r.enhanced.map(|e| e.to_string())),
            (501, Some("5.5.4".into())),
            "{evil:?}: {r}"
        );
    }
    assert_eq!(c.cmd("EHLO clean.example").code, 250);
    let r = c.cmd("MAIL FROM:<jo@domini.com> ENVID=x+0D+0ABcc:+20evil@example");
    assert_eq!(r.code, 501, "{r}");
    assert_eq!(c.cmd("MAIL FROM:<jo@domini.com>").code, 250);
    let r = c.cmd("RCPT TO:<pere@localhost> ORCPT=rfc822;pere@localhost+0D+0AX-Injected:+20yes");
    assert_eq!(r.code, 501, "{r}");
    assert_eq!(c.cmd("RCPT TO:<pere@localhost>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: clean\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read().code, 250);
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    let text = read(&files[0]);
    let head = text.split("\r\n\r\n").next().unwrap();
    assert!(head.contains("Received: from clean.example"), "{head}");
    assert!(!head.contains("X-Injected"), "{head}");
    for line in head.split("\r\n") {
        assert!(!line.contains('\r') && !line.contains('\0'), "{line:?}");
    }
}
