//! TLS, AUTH, SMTPUTF8, BDAT and the PROXY protocol against `correu serve`,
//! with real clients: swaks, curl and Python's smtplib and ssl.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

struct Server {
    proc: Proc,
    mx: SocketAddr,
    submission: SocketAddr,
    submissions: SocketAddr,
    /// The served certificate's file (replaced to test rotation) and the CA
    /// that signed it.
    cert: PathBuf,
    ca: PathBuf,
    mail: PathBuf,
}

/// `correu serve` with all three listeners, a certificate and one account
/// (jo@localhost / secret); `extra_smtp` goes in `[smtp]`.
fn server(dir: &Path, extra_smtp: &str) -> Server {
    let TestCert { cert, key, ca } = test_cert(dir, "first");
    let (st, hash, err) = run_with_stdin(CORREU, &["hash-password"], "secret\n");
    assert!(st.success(), "{err}");
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, format!("jo@localhost:{}\n", hash.trim())).unwrap();
    let cfg = dir.join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nsubmissions = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\nauth_file = \"{}\"\n{extra_smtp}\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n",
            cert.display(),
            key.display(),
            passwd.display()
        ),
    )
    .unwrap();
    let mut proc = Proc::correu(CORREU, "serve", dir, &["serve"], &cfg);
    let l = proc.serve_listeners();
    let find = |role: &str| l.iter().find(|(_, r)| r == role).unwrap().0;
    Server {
        mx: find("mx"),
        submission: find("submission"),
        submissions: find("submissions"),
        proc,
        cert,
        ca,
        mail: dir.join("mail/localhost"),
    }
}

fn py(script: &str) -> String {
    let (st, out, err) = run(&python(), &["-c", script]);
    assert!(st.success(), "python failed:\n{script}\n{out}\n{err}");
    out
}

#[test]
fn submission_needs_starttls_then_auth_and_then_relays() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "trusted_networks = []");
    let sub = s.submission.to_string();
    let common = [
        "--from",
        "jo@localhost",
        "--to",
        "pere@localhost",
        "--server",
        &sub,
    ];

    // In the clear: no AUTH offered, none accepted, no MAIL.
    let mut c = Smtp::connect(s.submission);
    c.read();
    let ehlo = c.cmd("EHLO client");
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"));
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "{ehlo:?}"
    );
    assert!(
        c.cmd("AUTH PLAIN AGpvQGxvY2FsaG9zdABzZWNyZXQ=")
            .to_string()
            .starts_with("538 5.7.11")
    );
    assert!(
        c.cmd("MAIL FROM:<jo@localhost>")
            .to_string()
            .starts_with("530 5.7.0")
    );

    // STARTTLS and AUTH PLAIN, then LOGIN: delivered.
    let auth = |mech: &str, password: &str, subject: &str| {
        let header = format!("Subject: {subject}");
        swaks(
            &[
                &common[..],
                &[
                    "--tls",
                    "--auth",
                    mech,
                    "--auth-user",
                    "jo@localhost",
                    "--auth-password",
                    password,
                    "--header",
                    &header,
                ],
            ]
            .concat(),
        )
    };
    let (ok, out) = auth("PLAIN", "secret", "plain");
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let (ok, out) = auth("LOGIN", "secret", "login");
    assert!(ok, "{out}");
    // A wrong password is refused with 535 5.7.8.
    let (ok, out) = auth("PLAIN", "wrong", "refused");
    assert!(!ok && out.contains("535 5.7.8"), "{out}");

    // An authenticated user may relay; an unauthenticated MX client may not.
    let (ok, out) = swaks(&[
        "--server",
        &sub,
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "jo@localhost",
        "--auth-password",
        "secret",
        "--from",
        "jo@localhost",
        "--to",
        "ana@remote.test",
        "--quit-after",
        "RCPT",
    ]);
    assert!(ok && out.contains("250 2.1.5"), "{out}");
    let mx = s.mx.to_string();
    let (ok, out) = swaks(&[
        "--server",
        &mx,
        "--from",
        "jo@localhost",
        "--to",
        "ana@remote.test",
        "--quit-after",
        "RCPT",
    ]);
    assert!(!ok && out.contains("550 5.7.1"), "{out}");

    let files = wait_maildir(&s.mail.join("pere"), 2, Duration::from_secs(20));
    assert_eq!(files.len(), 2);
    for f in &files {
        let text = read(f);
        assert!(text.contains("with ESMTPSA id"), "{text}");
        assert!(text.contains("(using TLSv1.3 with cipher TLS13_"), "{text}");
        assert!(
            text.contains("(Authenticated sender: jo@localhost)"),
            "{text}"
        );
    }
    drop(s.proc);
}

#[test]
fn implicit_tls_curl_and_smtplib_with_smtputf8_and_bdat() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "");
    // Implicit TLS (RFC 8314) on the submissions port.
    let subs = s.submissions.to_string();
    let (ok, out) = swaks(&[
        "--server",
        &subs,
        "--tlsc",
        "--auth",
        "PLAIN",
        "--auth-user",
        "jo@localhost",
        "--auth-password",
        "secret",
        "--from",
        "jo@localhost",
        "--to",
        "marc@localhost",
        "--header",
        "Subject: implicit",
    ]);
    assert!(ok, "{out}");

    // curl with STARTTLS required, on the MX port.
    let eml = dir.path().join("m.eml");
    std::fs::write(&eml, "Subject: curl\r\n\r\nvia curl\r\n").unwrap();
    let url = format!("smtp://{}", s.mx);
    let (st, out, err) = run(
        "curl",
        &[
            "-sS",
            "--url",
            &url,
            "--mail-from",
            "jo@domini.com",
            "--mail-rcpt",
            "marc@localhost",
            "--upload-file",
            eml.to_str().unwrap(),
            "--ssl-reqd",
            "--cacert",
            s.cert.to_str().unwrap(),
        ],
    );
    assert!(st.success(), "curl: {out}{err}");

    // smtplib: STARTTLS verified against the test CA, a UTF-8 recipient
    // with SMTPUTF8, then BDAT by hand in two chunks.
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile={cert:?})
s = smtplib.SMTP('127.0.0.1', {port})
s.starttls(context=ctx)
s.ehlo('py.example')
assert s.has_extn('smtputf8') and s.has_extn('chunking') and s.has_extn('dsn'), s.esmtp_features
msg = 'Subject: unicode\r\n\r\nBon dia, Ànna!\r\n'.encode()
refused = s.sendmail('josé@exemple.cat', ['ànna@localhost'], msg, mail_options=['SMTPUTF8', 'BODY=8BITMIME'])
assert refused == {{}}, refused
code, _ = s.docmd('MAIL FROM:<jo@domini.com> RET=HDRS ENVID=abc')
assert code == 250, code
code, _ = s.docmd('RCPT TO:<marc@localhost> NOTIFY=FAILURE ORCPT=rfc822;marc@localhost')
assert code == 250, code
first = b'Subject: bdat\r\n\r\nfirst part, '
second = b'second part\r\n.\r\n..not an end\r\n'
s.send(b'BDAT %d\r\n' % len(first) + first)
code, text = s.getreply()
assert code == 250, (code, text)
s.send(b'BDAT %d LAST\r\n' % len(second) + second)
code, text = s.getreply()
assert code == 250 and b'queued as' in text, (code, text)
print(text.decode().split()[-1])
s.quit()
"#,
        cert = s.ca.to_str().unwrap(),
        port = s.mx.port()
    );
    let bdat_id = py(&script).trim().to_string();

    // smtplib's AUTH on the submission port, after STARTTLS.
    let login = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context(cafile={ca:?})
s = smtplib.SMTP('127.0.0.1', {port})
s.starttls(context=ctx)
try:
    s.login('jo@localhost', 'wrong')
    raise SystemExit('a wrong password was accepted')
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
s.login('jo@localhost', 'secret')
s.sendmail('jo@localhost', ['marc@localhost'], b'Subject: smtplib auth\r\n\r\nlogged in\r\n')
s.quit()
"#,
        ca = s.ca.to_str().unwrap(),
        port = s.submission.port()
    );
    py(&login);

    let anna = wait_maildir(&s.mail.join("%C3%A0nna"), 1, Duration::from_secs(20));
    assert_eq!(anna.len(), 1, "the UTF-8 mailbox got its message");
    assert!(read(&anna[0]).contains("Bon dia, Ànna!"));
    assert!(read(&anna[0]).starts_with("Return-Path: <josé@exemple.cat>"));
    let marc = wait_maildir(&s.mail.join("marc"), 4, Duration::from_secs(20));
    assert_eq!(marc.len(), 4);
    assert!(
        marc.iter()
            .any(|f| read(f).contains("(Authenticated sender: jo@localhost)")
                && read(f).contains("logged in"))
    );
    let bdat = marc
        .iter()
        .find(|f| f.to_string_lossy().contains(&bdat_id))
        .expect("the BDAT message");
    // BDAT is not dot-stuffed: the body is exactly the chunks.
    assert!(
        read(bdat)
            .ends_with("Subject: bdat\r\n\r\nfirst part, second part\r\n.\r\n..not an end\r\n"),
        "{}",
        read(bdat)
    );
    drop(s.proc);
}

#[test]
fn starttls_drops_commands_pipelined_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "");
    // CVE-2011-0411: "STARTTLS\r\nRSET\r\n" in one packet. The RSET must not
    // be answered inside the TLS session.
    let script = format!(
        r#"
import socket, ssl
s = socket.create_connection(('127.0.0.1', {port}))
f = s.makefile('rb')
def reply():
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l)
        if l[3:4] == ' ':
            return lines
reply()
s.sendall(b'EHLO x\r\n'); reply()
s.sendall(b'STARTTLS\r\nRSET\r\n')
assert reply()[0].startswith('220 2.0.0')
ctx = ssl.create_default_context(cafile={cert:?})
t = ctx.wrap_socket(s, server_hostname='localhost')
t.sendall(b'NOOP\r\n')
first = t.recv(4096).decode()
assert first.startswith('250 2.0.0 Ok'), first
assert first.count('\r\n') == 1, first
t.sendall(b'QUIT\r\n')
print('ok')
"#,
        port = s.mx.port(),
        cert = s.ca.to_str().unwrap()
    );
    assert_eq!(py(&script).trim(), "ok");
    drop(s.proc);
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "");
    let fetch = |port: u16| {
        py(&format!(
            r#"
import smtplib, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', {port}); s.starttls(context=ctx)
import hashlib; print(hashlib.sha256(s.sock.getpeercert(True)).hexdigest()); s.quit()
"#
        ))
    };
    let before = fetch(s.mx.port());
    let second = test_cert(dir.path(), "second");
    // Kubernetes swaps the files of a Secret in place.
    std::fs::copy(&second.key, dir.path().join("first.key")).unwrap();
    std::fs::copy(&second.cert, &s.cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = fetch(s.mx.port());
        if now != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still the old certificate"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(s.proc);
}

#[test]
fn proxy_protocol_gives_the_real_client_address() {
    let dir = tempfile::tempdir().unwrap();
    // Loopback is the load balancer; 198.51.100.0/24 is the trusted office.
    let s = server(
        dir.path(),
        "proxy_networks = [\"127.0.0.0/8\"]\ntrusted_networks = [\"198.51.100.0/24\"]",
    );
    let mut c = Smtp::connect(s.mx);
    c.send(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 25\r\n");
    assert_eq!(c.read().code, 220);
    c.cmd("EHLO office");
    assert_eq!(c.cmd("MAIL FROM:<jo@domini.com>").code, 250);
    assert_eq!(
        c.cmd("RCPT TO:<ana@remote.test>").code,
        250,
        "the office may relay"
    );

    // A v2 header for an outside client: no relaying.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 5, 10, 0, 0, 1, 0x9c, 0x40, 0, 25]);
    let mut c = Smtp::connect(s.mx);
    c.send(&v2);
    assert_eq!(c.read().code, 220);
    c.cmd("EHLO outside");
    c.cmd("MAIL FROM:<jo@domini.com>");
    assert!(
        c.cmd("RCPT TO:<ana@remote.test>")
            .to_string()
            .starts_with("550 5.7.1")
    );
    c.cmd("RSET");
    let r = c.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: proxied\r\n\r\nx\r\n",
    );
    let id = queue_id(&r);
    let files = wait_maildir(&s.mail.join("pere"), 1, Duration::from_secs(20));
    let text = read(&files[0]);
    assert!(
        text.contains("([203.0.113.5])") && text.contains(&id),
        "Received names the real client: {text}"
    );

    // From a proxy, no header means no session.
    let mut c = Smtp::connect(s.mx);
    c.send(b"EHLO sneaky\r\n");
    assert!(
        c.closed(),
        "a proxy connection without a PROXY header is dropped"
    );
    drop(s.proc);
}

#[test]
fn postfix_relays_into_correu_over_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "");
    let pf_dir = dir.path().join("postfix");
    let postfix = Postfix::start(
        &pf_dir,
        &format!(
            "relayhost = [127.0.0.1]:{}\nsmtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n",
            s.mx.port()
        ),
    );
    let server = format!("127.0.0.1:{}", postfix.port);
    let (ok, out) = swaks(&[
        "--server",
        &server,
        "--from",
        "jo@domini.com",
        "--to",
        "pere@localhost",
        "--header",
        "Subject: via postfix",
    ]);
    assert!(ok, "postfix took the message: {out}");
    let files = wait_maildir(&s.mail.join("pere"), 1, Duration::from_secs(60));
    assert_eq!(files.len(), 1, "postfix relayed it into Correu");
    let text = read(&files[0]);
    assert!(text.contains("Subject: via postfix"), "{text}");
    assert!(
        text.contains("Received: from postfix.test ([127.0.0.1])\r\n\t(using TLSv1."),
        "Correu saw Postfix over TLS: {text}"
    );
    assert!(text.contains("with ESMTPS id"), "{text}");
    drop(postfix);
    drop(s.proc);
}

#[test]
fn sslyze_finds_the_mozilla_intermediate_profile() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), "");
    let target = format!("127.0.0.1:{}", s.mx.port());
    let (st, out, err) = run(
        &python(),
        &[
            "-m",
            "sslyze",
            "--starttls",
            "smtp",
            "--mozilla_config",
            "intermediate",
            "--certinfo_ca_file",
            s.ca.to_str().unwrap(),
            &target,
        ],
    );
    assert!(
        st.success(),
        "sslyze says the TLS setup is not Mozilla intermediate compliant:\n{out}\n{err}"
    );
    assert!(out.contains("OK - Compliant"), "{out}");
    drop(s.proc);
}

/// Brute force, across replicas: an address that fails AUTH too often is
/// turned away (`421 4.7.0`) by every ingress sharing the Redis, while the
/// account's owner, from elsewhere, still logs in.
#[test]
fn failed_logins_are_limited_per_address_across_replicas() {
    let prefix = format!("correu-test-auth-{}", std::process::id());
    let extra = format!(
        "auth_failure_delay = \"10ms\"\nauth_client_failures = \"3/15m\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\""
    );
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = server(d1.path(), &extra);
    let two = server(d2.path(), &extra);
    let login = |s: &Server, from: &str, password: &str| {
        let server = s.submission.to_string();
        swaks(&[
            "--server",
            &server,
            "--local-interface",
            from,
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "jo@localhost",
            "--auth-password",
            password,
            "--quit-after",
            "AUTH",
            "--from",
            "jo@localhost",
            "--to",
            "ana@elsewhere.example",
        ])
    };
    for _ in 0..3 {
        let (ok, out) = login(&one, "127.0.0.1", "wrong");
        assert!(!ok && out.contains("535 5.7.8"), "{out}");
    }
    let (ok, out) = login(&one, "127.0.0.1", "secret");
    assert!(
        !ok && out.contains("421 4.7.0"),
        "the fourth try is turned away: {out}"
    );
    let (ok, out) = login(&two, "127.0.0.1", "secret");
    assert!(
        !ok && out.contains("421 4.7.0"),
        "the other replica knows: {out}"
    );
    let (ok, out) = login(&one, "127.0.0.2", "secret");
    assert!(
        ok && out.contains("235 2.7.0"),
        "the owner, elsewhere, logs in: {out}"
    );
    let (_, keys, _) = run(
        "redis-cli",
        &["--scan", "--pattern", &format!("{prefix}:*")],
    );
    for k in keys.split_whitespace() {
        run("redis-cli", &["del", k]);
    }
    drop((one, two));
}

/// On the implicit-TLS port nothing is said in the clear: with every slot
/// taken a new connection is closed without a word, and a client over its
/// connection rate hears `421` inside TLS. Handshakes that never started
/// used up the rate.
#[test]
fn implicit_tls_refusals_are_never_in_the_clear() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let s = server(
        dir.path(),
        "trusted_networks = []\nmax_connections = 3\nconnection_rate = \"3/60s\"",
    );
    let stalled: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(s.submissions).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut over = std::net::TcpStream::connect(s.submissions).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut said = Vec::new();
    let n = over.read_to_end(&mut said).unwrap();
    assert_eq!(
        n,
        0,
        "closed without a word: {:?}",
        String::from_utf8_lossy(&said)
    );
    drop(stalled);
    std::thread::sleep(Duration::from_millis(300));

    let out = py(&format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(cafile={ca:?})
with socket.create_connection(("127.0.0.1", {port}), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as t:
        print(t.recv(512).decode())
"#,
        ca = s.ca.display().to_string(),
        port = s.submissions.port()
    ));
    assert!(out.starts_with("421 4.7.0"), "{out}");
    drop(s.proc);
}
