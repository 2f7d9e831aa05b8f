//! Inbound verification end to end: dnsmasq serves SPF, DKIM and DMARC
//! records for test domains, dkimpy (an independent signer) signs
//! messages, and `correu serve` on its MX port writes the verdicts into
//! `Authentication-Results` and acts on DMARC and SPF policy.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

/// An RSA key for `s1._domainkey.signed.test` and its DNS record.
fn dkim_key(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("dkim.pem");
    let (st, _, err) = run(
        "openssl",
        &["genrsa", "-out", key.to_str().unwrap(), "1024"],
    );
    assert!(st.success(), "{err}");
    let (st, b64, err) = run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl rsa -in {} -pubout -outform DER 2>/dev/null | base64 -w0",
                key.display()
            ),
        ],
    );
    assert!(st.success() && !b64.is_empty(), "{err}");
    (key, format!("v=DKIM1; k=rsa; p={}", b64.trim()))
}

/// `message` signed by dkimpy for `domain` with selector `s1`.
fn sign(key: &Path, domain: &str, message: &str) -> String {
    let script = format!(
        "import sys,dkim\nmsg=sys.stdin.buffer.read()\nkey=open({:?},'rb').read()\nsig=dkim.sign(msg,b's1',b'{domain}',key,include_headers=[b'from',b'to',b'subject'])\nsys.stdout.buffer.write(sig+msg)\n",
        key.to_str().unwrap()
    );
    let (st, out, err) = run_with_stdin(&python(), &["-c", &script], message);
    assert!(st.success(), "dkimpy: {err}");
    out
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: Jo <{from}>\r\nTo: pere@localhost\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nHello from {from}.\r\n"
    )
}

fn send(addr: SocketAddr, from: &str, to: &str, body: &str) -> correu_smtp::Reply {
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.signed.test");
    let r = c.send_mail(from, &[to], body);
    c.cmd("QUIT");
    r
}

/// The one stored copy of the message with `subject` under `dir`.
fn stored(dir: &Path, subject: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
                for e in entries.flatten() {
                    let text = read(&e.path());
                    if text.contains(&format!("Subject: {subject}\r\n")) {
                        return text;
                    }
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{subject} never reached {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a plain message from `from` to pere@localhost, which must be
/// accepted and stored in `inbox`; this server's `Authentication-Results`.
fn accepted(addr: SocketAddr, inbox: &Path, from: &str, subject: &str) -> String {
    let r = send(addr, from, "pere@localhost", &message(from, subject));
    assert_eq!(r.code, 250, "{from}: {r}");
    auth_results(&stored(inbox, subject)).remove(0)
}

/// Sends a message and asserts it was refused with a 550: the reply.
fn refused(addr: SocketAddr, from: &str, to: &str, subject: &str) -> String {
    let r = send(addr, from, to, &message(from, subject));
    assert_eq!(r.code, 550, "{from} to {to}: {r:?}");
    r.to_string()
}

/// The `Authentication-Results` field(s) of a stored message, unfolded.
fn auth_results(text: &str) -> Vec<String> {
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut fields: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(f) = fields.last_mut() {
                f.push(' ');
                f.push_str(line.trim());
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields
        .into_iter()
        .filter(|f| {
            f.to_ascii_lowercase()
                .starts_with("authentication-results:")
        })
        .collect()
}

/// A name server that answers every query SERVFAIL (a broken
/// authoritative server), on a UDP port of its own.
fn servfail_server(dir: &Path) -> (Proc, u16) {
    let script = concat!(
        "import socket\n",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n",
        "s.bind(('127.0.0.1', 0))\n",
        "print('port', s.getsockname()[1], flush=True)\n",
        "while True:\n",
        "    q, a = s.recvfrom(4096)\n",
        "    if len(q) < 12:\n",
        "        continue\n",
        "    # The same id and question; QR, RD copied, RA, RCODE 2.\n",
        "    s.sendto(q[:2] + bytes([0x80 | (q[2] & 1), 0x82]) + q[4:6] + bytes(6) + q[12:], a)\n",
    );
    let mut p = Proc::spawn("servfail", dir, &python(), &["-c", script], &[]);
    let line = p.wait_for("port ", Duration::from_secs(10));
    let port = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the SERVFAIL server's port");
    (p, port)
}

#[test]
fn mail_from_the_internet_is_verified_marked_and_policed() {
    let dir = tempfile::tempdir().unwrap();
    let (key, dkim_txt) = dkim_key(dir.path());
    // The name server of broken.test answers SERVFAIL.
    let (_servfail, servfail_port) = servfail_server(dir.path());
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            // SPF, DKIM and DMARC all in place.
            "txt-record=signed.test,\"v=spf1 ip4:127.0.0.0/8 -all\"",
            &format!("txt-record=s1._domainkey.signed.test,\"{dkim_txt}\""),
            "txt-record=_dmarc.signed.test,\"v=DMARC1; p=reject\"",
            // Nobody may send for these, and DMARC says what to do.
            "txt-record=forged.test,\"v=spf1 -all\"",
            "txt-record=_dmarc.forged.test,\"v=DMARC1; p=reject\"",
            "txt-record=suspect.test,\"v=spf1 -all\"",
            "txt-record=_dmarc.suspect.test,\"v=DMARC1; p=quarantine\"",
            "txt-record=soft.test,\"v=spf1 ~all\"",
            "txt-record=hardfail.test,\"v=spf1 -all\"",
            "txt-record=client.signed.test,\"v=spf1 ip4:127.0.0.1 -all\"",
            &format!("server=/broken.test/127.0.0.1#{servfail_port}"),
        ],
    );
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.correu.test\"\ndomains = [\"localhost\", \"strict.test\"]\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\ntrusted_networks = [\"127.0.0.2/32\"]\n\
             [dns]\nserver = \"127.0.0.1:{dns_port}\"\n\
             [inbound.domains.\"strict.test\"]\nspf_fail = \"reject\"\n\
             [storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n"
        ),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let addr = p.serve_smtp_addr();
    let inbox = dir.path().join("mail/localhost/pere");

    // 1. Signed by dkimpy, sent from an address SPF allows: all pass. A
    // forged Authentication-Results under our name is removed; another
    // server's stays.
    let body = sign(&key, "signed.test", &message("jo@signed.test", "good"));
    let body = format!(
        "Authentication-Results: mx.correu.test; dmarc=pass (forged)\r\nAuthentication-Results: elsewhere.test; spf=pass\r\n{body}"
    );
    assert_eq!(
        send(addr, "jo@signed.test", "pere@localhost", &body).code,
        250
    );
    let got = stored(&inbox, "good");
    let ar = auth_results(&got);
    assert_eq!(ar.len(), 2, "ours once, the other server's kept: {ar:?}");
    assert!(!got.contains("(forged)"), "{got}");
    assert!(ar.iter().any(|f| f.contains("elsewhere.test; spf=pass")));
    let ours = &ar[0];
    assert!(
        ours.starts_with("Authentication-Results: mx.correu.test;"),
        "{ours}"
    );
    for want in [
        "dkim=pass",
        "header.i=@signed.test header.s=s1",
        "spf=pass",
        "smtp.mailfrom=jo@signed.test",
        "smtp.helo=client.signed.test",
        "dmarc=pass header.from=signed.test policy.dmarc=reject",
    ] {
        assert!(ours.contains(want), "{want} in {ours}");
    }
    // Ours is above our Received: (RFC 8601 §5).
    assert!(
        got.find("Authentication-Results: mx.correu.test").unwrap()
            < got.find("Received:").unwrap()
    );

    // 2. The body changed after signing: DKIM does not pass, but SPF is
    // aligned and DMARC passes.
    let body = sign(&key, "signed.test", &message("jo@signed.test", "altered"))
        .replace("Hello from", "Hullo from");
    assert_eq!(
        send(addr, "jo@signed.test", "pere@localhost", &body).code,
        250
    );
    let ours = auth_results(&stored(&inbox, "altered")).remove(0);
    // mail-auth's word for a body hash that does not match is `neutral`
    // (RFC 8601 §2.7.1: a signature that could not be processed).
    assert!(
        !ours.contains("dkim=pass") && ours.contains("body hash did not verify"),
        "{ours}"
    );
    assert!(ours.contains("dmarc=pass"), "{ours}");

    // 3. DMARC p=reject and nothing aligned: refused, naming the policy.
    let r = refused(addr, "ceo@forged.test", "pere@localhost", "wire money");
    assert!(
        r.contains("550 5.7.1") && r.contains("DMARC policy of forged.test"),
        "{r}"
    );

    // 4. DMARC p=quarantine: accepted, into the Junk folder (Maildir++).
    let r = send(
        addr,
        "a@suspect.test",
        "pere@localhost",
        &message("a@suspect.test", "suspicious"),
    );
    assert_eq!(r.code, 250, "{r:?}");
    let junk = stored(&inbox.join(".Junk"), "suspicious");
    assert!(inbox.join(".Junk/maildirfolder").exists());
    assert!(
        auth_results(&junk)[0]
            .contains("dmarc=fail header.from=suspect.test policy.dmarc=quarantine"),
        "{junk}"
    );

    // 5. SPF softfail and none are marked, never refused.
    let ours = accepted(addr, &inbox, "a@soft.test", "soft");
    assert!(
        ours.contains("spf=softfail") && ours.contains("dmarc=none"),
        "{ours}"
    );
    let ours = accepted(addr, &inbox, "a@nothing.test", "plain");
    assert!(
        ours.contains("spf=none") && ours.contains("dkim=none"),
        "{ours}"
    );

    // 6. The sender's DNS fails: temperror, accepted.
    let ours = accepted(addr, &inbox, "a@broken.test", "dns down");
    assert!(
        ours.contains("spf=temperror") && !ours.contains("timed out"),
        "{ours}"
    );

    // 7. SPF fail: recorded for localhost, refused for strict.test, whose
    // policy says so.
    let ours = accepted(addr, &inbox, "a@hardfail.test", "spf fail");
    assert!(ours.contains("spf=fail"), "{ours}");
    let r = refused(addr, "a@hardfail.test", "pere@strict.test", "spf strict");
    assert!(r.starts_with("550 5.7.23"), "{r}");

    // 8. A trusted network is not verified (but forgeries are still removed).
    let mut c = Smtp::from_stream(connect_from([127, 0, 0, 2], addr));
    c.read();
    c.cmd("EHLO relay.example");
    let body = format!(
        "Authentication-Results: mx.correu.test; dkim=pass\r\n{}",
        message("ceo@forged.test", "trusted")
    );
    assert_eq!(
        c.send_mail("ceo@forged.test", &["pere@localhost"], &body)
            .code,
        250
    );
    assert!(auth_results(&stored(&inbox, "trusted")).is_empty());

    // Every decision is in the log with its queue id, and counted.
    let log = p.output();
    assert!(
        log.contains("\"action\":\"reject\"") && log.contains("\"reason\":\"dmarc\""),
        "{log}"
    );
    let (_, metrics) = http_get(p.listening("telemetry listening"), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("correu_smtp_auth_actions")
                && l.contains("action=\"reject\"")
                && l.contains("reason=\"dmarc\"")),
        "{metrics}"
    );
}

/// `correu serve` for the blocklist and greylisting tests: every loopback
/// client is from the internet; `extra` is more of `[inbound]`.
fn serve_inbound(dir: &Path, name: &str, dns_port: u16, extra: &str) -> (Proc, SocketAddr) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.correu.test\"\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\ntrusted_networks = []\n\
             [dns]\nserver = \"127.0.0.1:{dns_port}\"\n\
             [storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{name}-mail\"\n[queue]\nspool = \"{name}-queue\"\n\
             {extra}\n"
        ),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, name, dir, &["serve"], &cfg);
    let addr = p.serve_smtp_addr();
    (p, addr)
}

/// The greeting a client at `src` gets.
fn greeting(src: [u8; 4], addr: SocketAddr) -> correu_smtp::Reply {
    let mut c = Smtp::from_stream(connect_from(src, addr));
    c.read()
}

#[test]
fn blocklists_turn_away_listed_clients_and_domains_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            // 127.0.0.3 is on the strong list; 127.0.0.4 on one weak list,
            // 127.0.0.5 on both; 127.0.0.6 gets the "query refused" code.
            "address=/3.0.0.127.strong.test/127.0.0.2",
            "address=/4.0.0.127.weak1.test/127.0.0.2",
            "address=/5.0.0.127.weak1.test/127.0.0.2",
            "address=/5.0.0.127.weak2.test/127.0.0.10",
            "address=/6.0.0.127.strong.test/127.255.255.254",
            // A domain list naming spammer.test.
            "address=/spammer.test.dbl.test/127.0.1.2",
        ],
    );
    let (mut p, addr) = serve_inbound(
        dir.path(),
        "serve",
        dns_port,
        "[[inbound.blocklists]]\nzone = \"strong.test\"\n\
         [[inbound.blocklists]]\nzone = \"weak1.test\"\nweight = 0.5\n\
         [[inbound.blocklists]]\nzone = \"weak2.test\"\nweight = 0.5\n\
         [[inbound.blocklists]]\nzone = \"dbl.test\"\nkind = \"domain\"\n",
    );
    // Not listed, listed on one weak list only, or answered "refused":
    // served.
    for src in [[127, 0, 0, 1], [127, 0, 0, 4], [127, 0, 0, 6]] {
        let r = greeting(src, addr);
        assert_eq!(r.code, 220, "{src:?}: {r}");
    }
    // Listed on the strong list, or on two weak ones: refused before the
    // greeting, naming the lists.
    let r = greeting([127, 0, 0, 3], addr);
    assert_eq!(
        r.to_string(),
        "554 5.7.1 Error: client [127.0.0.3] is listed by strong.test"
    );
    let r = greeting([127, 0, 0, 5], addr);
    assert!(
        r.to_string().starts_with("554 5.7.1 ") && r.text().contains("weak1.test, weak2.test"),
        "{r}"
    );
    // A sender domain on the domain list: refused once the message is in.
    let r = send(
        addr,
        "jo@spammer.test",
        "pere@localhost",
        &message("jo@spammer.test", "spam"),
    );
    assert_eq!(r.code, 554, "{r}");
    assert!(r.text().contains("listed by dbl.test"), "{r}");
    // The same from a clean domain is accepted.
    let r = send(
        addr,
        "jo@clean.test",
        "pere@localhost",
        &message("jo@clean.test", "ham"),
    );
    assert_eq!(r.code, 250, "{r}");
    let log = p.output();
    assert!(log.contains("client listed in DNS blocklists"), "{log}");
    let (_, metrics) = http_get(p.listening("telemetry listening"), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("correu_smtp_blocklist_hits") && l.contains("zone=\"dbl.test\"")),
        "{metrics}"
    );
}

#[test]
fn greylisting_is_shared_by_two_ingress_processes_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &["txt-record=bigmail.test,\"v=spf1 ip4:127.0.0.0/8 -all\""],
    );
    let prefix = format!("correu-test-grey-{}", std::process::id());
    let extra = format!(
        "[inbound.greylist]\nenabled = true\ndelay = \"2s\"\nskip_domains = [\"bigmail.test\"]\n\
         [redis]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}\"\n"
    );
    let (_a, one) = serve_inbound(dir.path(), "one", dns_port, &extra);
    let (_b, two) = serve_inbound(dir.path(), "two", dns_port, &extra);
    let body = message("jo@sender.test", "grey");

    // First try on one replica: deferred. The retry on the other, too
    // soon: still deferred (it knows the triplet).
    let r = send(one, "jo@sender.test", "pere@localhost", &body);
    assert_eq!(r.code, 451, "{r}");
    assert!(r.to_string().starts_with("451 4.7.1 Greylisted"), "{r}");
    let r = send(two, "jo@sender.test", "pere@localhost", &body);
    assert_eq!(r.code, 451, "{r}");
    // After the delay the retry passes, wherever it lands, and the
    // triplet then passes at once.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(
        send(two, "jo@sender.test", "pere@localhost", &body).code,
        250
    );
    assert_eq!(
        send(one, "jo@sender.test", "pere@localhost", &body).code,
        250
    );
    // Another sender is another triplet.
    assert_eq!(
        send(one, "ana@sender.test", "pere@localhost", &body).code,
        451
    );
    // A sender of a skipped domain whose SPF passes is never held.
    let r = send(
        one,
        "jo@bigmail.test",
        "pere@localhost",
        &message("jo@bigmail.test", "big"),
    );
    assert_eq!(r.code, 250, "{r}");

    let (_, keys, _) = run(
        "redis-cli",
        &["--scan", "--pattern", &format!("{prefix}:*")],
    );
    assert!(
        keys.contains(":grey:127.0.0.0/24:"),
        "triplets are in Redis: {keys}"
    );
    for k in keys.split_whitespace() {
        run("redis-cli", &["del", k]);
    }
}
