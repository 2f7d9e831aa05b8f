//! Delivery to the world: a private Postfix as the remote MX, found through
//! dnsmasq; TLS policies; bounces; a Correu smarthost with AUTH.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

/// Postfix as the MX of remote.test: it knows ana@remote.test only, offers
/// STARTTLS with a certificate for localhost signed by the test CA.
fn remote_postfix(dir: &Path, cert: &TestCert) -> Postfix {
    remote_postfix_with(dir, cert, "")
}

/// [`remote_postfix`] with more of main.cf.
fn remote_postfix_with(dir: &Path, cert: &TestCert, extra: &str) -> Postfix {
    Postfix::start(
        &dir.join("postfix"),
        &format!(
            "virtual_mailbox_domains = remote.test\nvirtual_mailbox_base = {{VMAIL}}\nvirtual_mailbox_maps = inline:{{ana@remote.test=ana/}}\nvirtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_transport = virtual\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\n{extra}\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
}

fn serve(dir: &Path, name: &str, extra: &str) -> (Proc, SocketAddr) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{name}-mail\"\n[queue]\nspool = \"{name}-queue\"\nretry_delays = [\"{retry}\"]\n{extra}\n",
            retry = if extra.contains("delay_warning") { "1s" } else { "1m" }
        ),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, name, dir, &["serve"], &cfg);
    let addr = p.serve_smtp_addr();
    (p, addr)
}

fn send(addr: SocketAddr, to: &[&str], subject: &str) -> String {
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    let id = queue_id(&c.send_mail(
        "jo@localhost",
        to,
        &format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n"),
    ));
    c.cmd("QUIT");
    id
}

fn only_file(dir: &Path, within: Duration) -> String {
    let files = wait_maildir(dir, 1, within);
    assert_eq!(files.len(), 1, "one message in {}", dir.display());
    read(&files[0])
}

fn maildir(dir: &Path, name: &str, user: &str) -> PathBuf {
    dir.join(format!("{name}-mail/localhost/{user}"))
}

#[test]
fn mx_fallback_tls_partial_success_and_the_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix(dir.path(), &cert);
    // mx1 (preference 10) is 127.0.0.2, where nothing listens: refused.
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=remote.test,mx1.remote.test,10",
            "mx-host=remote.test,mx2.remote.test,20",
            "address=/mx1.remote.test/127.0.0.2",
            "address=/mx2.remote.test/127.0.0.1",
        ],
    );
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {}\n",
            postfix.port
        ),
    );
    let id = send(addr, &["ana@remote.test", "nobody@remote.test"], "partial");

    // ana: at Postfix, received over TLS (opportunistic: the certificate is
    // not checked).
    let at_postfix = only_file(&postfix.vmail.join("ana"), Duration::from_secs(60));
    assert!(
        at_postfix.contains("Subject: partial") && at_postfix.contains(&format!("id {id}")),
        "{at_postfix}"
    );
    assert!(
        at_postfix.contains("(using TLSv1.3"),
        "Postfix saw TLS: {at_postfix}"
    );
    serve.wait_for("mx1.remote.test", Duration::from_secs(5));

    // nobody: refused by Postfix with 550 5.1.1, bounced to jo@localhost.
    let dsn = only_file(&maildir(dir.path(), "a", "jo"), Duration::from_secs(30));
    for want in [
        "Return-Path: <>\r\n",
        "From: Mail Delivery System <MAILER-DAEMON@localhost>",
        "Content-Type: multipart/report; report-type=delivery-status;",
        &format!("X-Correu-Queue-ID: {id}\r\n"),
        "Final-Recipient: rfc822; nobody@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx2.remote.test\r\nDiagnostic-Code: smtp; 550 5.1.1",
        "Content-Type: message/rfc822\r\n\r\nReceived: from client.example",
        "body of partial",
    ] {
        assert!(dsn.contains(want), "missing {want:?} in the bounce:\n{dsn}");
    }
    assert!(
        !dsn.contains("Final-Recipient: rfc822; ana@remote.test"),
        "ana succeeded: no report without NOTIFY=SUCCESS"
    );
}

/// One caching resolver per process: mail relayed to one domain asks its
/// MX and the MX host's address once while the answers live (dnsmasq
/// gives them a TTL of 300 s and logs every query it gets).
#[test]
fn relayed_mail_asks_dns_once_while_the_answers_live() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix(dir.path(), &cert);
    let (dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=remote.test,mx.remote.test,10",
            "address=/mx.remote.test/127.0.0.1",
            "local-ttl=300",
            "log-queries",
            "log-facility=-",
        ],
    );
    let (_serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {}\n",
            postfix.port
        ),
    );
    // The first message fills the cache; the next 19 find it there.
    send(addr, &["ana@remote.test"], "cached 0");
    only_file(&postfix.vmail.join("ana"), Duration::from_secs(60));
    for i in 1..20 {
        send(addr, &["ana@remote.test"], &format!("cached {i}"));
    }
    let got = wait_maildir(&postfix.vmail.join("ana"), 20, Duration::from_secs(60));
    assert_eq!(got.len(), 20);
    let log = dns.output();
    let asked = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(asked("query[MX] remote.test "), 1, "{log}");
    assert_eq!(asked("query[A] mx.remote.test "), 1, "{log}");
}

#[test]
fn a_null_mx_bounces_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns_port) = dnsmasq(dir.path(), &["mx-host=nullmx.test,.,0"]);
    let (_serve, addr) = serve(
        dir.path(),
        "a",
        &format!("[dns]\nserver = \"127.0.0.1:{dns_port}\"\n"),
    );
    send(addr, &["x@nullmx.test"], "nowhere");
    let dsn = only_file(&maildir(dir.path(), "a", "jo"), Duration::from_secs(30));
    assert!(
        dsn.contains(
            "Final-Recipient: rfc822; x@nullmx.test\r\nAction: failed\r\nStatus: 5.1.10\r\n"
        ),
        "{dsn}"
    );
    assert!(dsn.contains("null MX"), "{dsn}");
}

#[test]
fn a_mail_loop_ends_in_one_bounce() {
    let dir = tempfile::tempdir().unwrap();
    // remote.test is routed to this server itself: every copy it relays
    // comes back with one more Received: field, until it has too many.
    let port = free_port();
    let cfg = dir.path().join("loop.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nmax_hops = 10\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"loop-mail\"\n[queue]\nspool = \"loop-queue\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    // Ingress's "queued" lines (debug) count the copies.
    let mut serve = Proc::spawn(
        "loop",
        dir.path(),
        CORREU,
        &["serve", "--config", cfg.to_str().unwrap()],
        &[("CORREU_LOG", "info,correu_ingress=debug")],
    );
    let addr = serve.serve_smtp_addr();
    send(addr, &["ana@remote.test"], "round and round");
    let bounce = only_file(&maildir(dir.path(), "loop", "jo"), Duration::from_secs(60));
    assert!(
        bounce.contains(
            "Final-Recipient: rfc822; ana@remote.test\r\nAction: failed\r\nStatus: 5.4.6\r\n"
        ),
        "{bounce}"
    );
    assert!(
        bounce.contains("too many hops (11 Received: fields"),
        "{bounce}"
    );
    serve.wait_for("too many hops", Duration::from_secs(5));
    // The loop is over: no more copies go round, no second bounce comes.
    std::thread::sleep(Duration::from_secs(2));
    let relayed = serve.output().matches("\"message\":\"queued\"").count();
    assert_eq!(
        relayed, 11,
        "the first copy and ten relayed ones, then none"
    );
    assert_eq!(
        wait_maildir(&maildir(dir.path(), "loop", "jo"), 2, Duration::ZERO).len(),
        1
    );
}

#[test]
fn required_tls_waits_for_a_certificate_it_can_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix(dir.path(), &cert);
    let route = format!(
        "[delivery.routes]\n\"remote.test\" = {{ host = \"localhost\", port = {}, tls = \"required\" }}\n",
        postfix.port
    );
    // Without the test CA the certificate does not verify: deferred.
    let (mut strict, addr) = serve(dir.path(), "strict", &route);
    let id = send(addr, &["ana@remote.test"], "unverified");
    let deferred = strict.wait_for("\"message\":\"delivery deferred\"", Duration::from_secs(30));
    assert!(
        deferred.contains(&id) && deferred.contains("4.7.5"),
        "{deferred}"
    );
    assert!(wait_maildir(&postfix.vmail.join("ana"), 1, Duration::from_secs(2)).is_empty());
    drop(strict);
    // With it: delivered over verified TLS.
    let (_trusting, addr) = serve(
        dir.path(),
        "trusting",
        &format!(
            "[delivery]\ntls_ca_file = \"{}\"\n{route}",
            cert.ca.display()
        ),
    );
    send(addr, &["ana@remote.test"], "verified");
    let got = only_file(&postfix.vmail.join("ana"), Duration::from_secs(30));
    assert!(
        got.contains("Subject: verified") && got.contains("(using TLSv1.3"),
        "{got}"
    );
}

#[test]
fn a_smarthost_with_auth() {
    let dir = tempfile::tempdir().unwrap();
    // The smarthost: another Correu, submission with TLS and one account.
    let cert = test_cert(dir.path(), "relay");
    let (st, hash, _) = run(
        "sh",
        &["-c", &format!("echo relaypass | {CORREU} hash-password")],
    );
    assert!(st.success());
    let accounts = dir.path().join("accounts");
    std::fs::write(&accounts, format!("sender@localhost:{}\n", hash.trim())).unwrap();
    let relay_cfg = dir.path().join("relay.toml");
    std::fs::write(
        &relay_cfg,
        format!(
            "domains = [\"remote.test\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\ntrusted_networks = []\ntls_certificate = \"{}\"\ntls_key = \"{}\"\nauth_file = \"{}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"relay-mail\"\n[queue]\nspool = \"relay-queue\"\n",
            cert.cert.display(),
            cert.key.display(),
            accounts.display()
        ),
    )
    .unwrap();
    let mut relay = Proc::correu(CORREU, "relay", dir.path(), &["serve"], &relay_cfg);
    let submission = relay
        .serve_listeners()
        .into_iter()
        .find(|(_, role)| role == "submission")
        .unwrap()
        .0;
    let password = dir.path().join("relay-password");
    std::fs::write(&password, "relaypass\n").unwrap();
    let (_serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\ntls_ca_file = \"{}\"\n[delivery.routes]\n\"*\" = {{ host = \"localhost\", port = {}, tls = \"required\", auth_user = \"sender@localhost\", auth_password_file = \"{}\" }}\n",
            cert.ca.display(),
            submission.port(),
            password.display()
        ),
    );
    let id = send(addr, &["ana@remote.test"], "via smarthost");
    let got = only_file(
        &dir.path().join("relay-mail/remote.test/ana"),
        Duration::from_secs(30),
    );
    assert!(
        got.contains("Subject: via smarthost") && got.contains(&format!("id {id}")),
        "{got}"
    );
    assert!(
        got.contains("(Authenticated sender: sender@localhost)") && got.contains("with ESMTPSA"),
        "{got}"
    );
}

#[test]
fn a_destination_over_its_rate_waits_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote");
    let (_mx, mx_port) = aiosmtpd(dir.path(), &remote);
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\ndomain_rate = \"1/1h\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{mx_port}\"\n\"other.test\" = \"127.0.0.1:{mx_port}\"\n"
        ),
    );
    send(addr, &["ana@remote.test"], "first");
    assert_eq!(wait_maildir(&remote, 1, Duration::from_secs(30)).len(), 1);
    let second = send(addr, &["ana@remote.test"], "second");
    let deferred = serve.wait_for("\"message\":\"delivery deferred\"", Duration::from_secs(30));
    assert!(
        deferred.contains(&second) && deferred.contains("4.4.5"),
        "{deferred}"
    );
    send(addr, &["pau@other.test"], "elsewhere");
    let files = wait_maildir(&remote, 2, Duration::from_secs(30));
    assert_eq!(files.len(), 2, "another domain is not held up");
    assert!(files.iter().any(|f| read(f).contains("Subject: elsewhere")));
    assert!(
        !files.iter().any(|f| read(f).contains("Subject: second")),
        "the second waits for its window"
    );
}

#[test]
fn outbound_mail_is_dkim_signed_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dkim.pem");
    let (st, out, err) = run(
        CORREU,
        &[
            "dkim",
            "keygen",
            "--domain",
            "signer.test",
            "--selector",
            "s1",
            "--algorithm",
            "ed25519-sha256",
            "--out",
            key.to_str().unwrap(),
        ],
    );
    assert!(st.success(), "{err}");
    let txt = out
        .split('"')
        .nth(1)
        .expect("the TXT record in quotes")
        .to_string();
    assert!(txt.starts_with("v=DKIM1; k=ed25519; p="), "{txt}");
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[&format!("txt-record=s1._domainkey.signer.test,\"{txt}\"")],
    );
    // The receiving side: another Correu that owns remote.test.
    let receiver_cfg = dir.path().join("receiver.toml");
    std::fs::write(
        &receiver_cfg,
        "domains = [\"remote.test\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"receiver-mail\"\n[queue]\nspool = \"receiver-queue\"\n",
    )
    .unwrap();
    let mut receiver = Proc::correu(CORREU, "receiver", dir.path(), &["serve"], &receiver_cfg);
    let receiver_addr = receiver.serve_smtp_addr();
    let (_signer, addr) = serve(
        dir.path(),
        "signer",
        &format!(
            "[delivery.routes]\n\"remote.test\" = \"{receiver_addr}\"\n[delivery.dkim.\"signer.test\"]\nselector = \"s1\"\nkey_file = \"{}\"\nalgorithm = \"ed25519-sha256\"\n",
            key.display()
        ),
    );
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    let r = c.send_mail(
        "jo@signer.test",
        &["ana@remote.test"],
        "From: Jo <jo@signer.test>\r\nTo: ana@remote.test\r\nSubject: signed\r\n\r\nSigned and sealed.\r\n",
    );
    assert_eq!(r.code, 250);
    let got = only_file(
        &dir.path().join("receiver-mail/remote.test/ana"),
        Duration::from_secs(30),
    );
    assert!(
        got.contains("DKIM-Signature: v=1; a=ed25519-sha256"),
        "{got}"
    );
    assert!(
        got.contains("d=signer.test") && got.contains("s=s1"),
        "{got}"
    );

    // mail-auth's verifier, asking dnsmasq for the key.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let resolver = correu_runtime::dns::resolver(&correu_runtime::config::DnsConfig {
            server: Some(SocketAddr::from(([127, 0, 0, 1], dns_port))),
            ..Default::default()
        })
        .unwrap();
        let auth = mail_auth::MessageAuthenticator(resolver);
        let msg = mail_auth::AuthenticatedMessage::parse(got.as_bytes()).unwrap();
        auth.verify_dkim(&msg)
            .await
            .iter()
            .map(|o| format!("{:?}", o.result()))
            .collect::<Vec<_>>()
    });
    assert_eq!(results, vec!["Pass".to_string()], "the signature verifies");
}

#[test]
fn one_connection_carries_several_messages_to_the_same_host() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix(dir.path(), &cert);
    let (_serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\nconnection_idle = \"30s\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
            postfix.port
        ),
    );
    for n in 1..=3 {
        send(addr, &["ana@remote.test"], &format!("message {n}"));
        assert_eq!(
            wait_maildir(&postfix.vmail.join("ana"), n, Duration::from_secs(30)).len(),
            n
        );
    }
    let log = std::fs::read_to_string(&postfix.log).unwrap();
    let connects = log
        .lines()
        .filter(|l| l.contains("postfix/smtpd") && l.contains("]: connect from"))
        .count();
    // The test kit's readiness probe connects once and says nothing.
    let probes = log.matches("lost connection after CONNECT").count();
    assert_eq!(
        connects - probes,
        1,
        "three messages over one connection:\n{log}"
    );
    assert_eq!(log.matches("client=localhost").count(), 3);
}

#[test]
fn a_delay_warning_is_sent_once_while_retries_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port: every attempt fails for now.
    let dead = ClosedPort::new();
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\ndelay_warning = \"1s\"\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
            dead.port
        ),
    );
    // (The helper retries every second when a delay warning is configured.)
    let id = send(addr, &["ana@remote.test"], "slow");
    let warning = only_file(&maildir(dir.path(), "a", "jo"), Duration::from_secs(60));
    for want in [
        "Subject: Delayed Mail (still being retried)",
        "Final-Recipient: rfc822; ana@remote.test\r\nAction: delayed\r\nStatus: 4.4.1\r\n",
        &format!("X-Correu-Queue-ID: {id}\r\n"),
        "Content-Type: text/rfc822-headers",
    ] {
        assert!(warning.contains(want), "missing {want:?}:\n{warning}");
    }
    // Later attempts send no second warning.
    let _third = serve.wait_for("\"attempt\":3", Duration::from_secs(30));
    assert_eq!(
        wait_maildir(&maildir(dir.path(), "a", "jo"), 2, Duration::from_secs(2)).len(),
        1
    );
}

#[test]
fn mta_sts_enforce_sends_only_to_named_mx_hosts_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let domains = ["good.test", "bad.test", "badcert.test", "try.test"];
    // One certificate names the good MX and every policy host; the MX of
    // badcert.test is the same Postfix, so its name does not verify.
    let mut names: Vec<String> = domains.iter().map(|d| format!("mta-sts.{d}")).collect();
    names.push("mx.good.test".into());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let cert = test_cert_for(dir.path(), "sts", &names);
    let boxes: Vec<String> = domains
        .iter()
        .map(|d| format!("ana@{d}={}/", d.trim_end_matches(".test")))
        .collect();
    let postfix = Postfix::start(
        &dir.path().join("postfix"),
        &format!(
            "virtual_mailbox_domains = {}\nvirtual_mailbox_base = {{VMAIL}}\nvirtual_mailbox_maps = inline:{{{}}}\nvirtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_transport = virtual\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\n",
            domains.join(" "),
            boxes.join(", "),
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let policy =
        |mode: &str, mx: &str| format!("version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n");
    let (mut https, https_port) = mta_sts_server(
        dir.path(),
        &cert,
        &[
            ("mta-sts.good.test", &policy("enforce", "*.good.test")),
            ("mta-sts.bad.test", &policy("enforce", "mail.bad.test")),
            (
                "mta-sts.badcert.test",
                &policy("enforce", "mx.badcert.test"),
            ),
            ("mta-sts.try.test", &policy("testing", "mail.try.test")),
        ],
    );
    let mut dns = Vec::new();
    for d in domains {
        dns.push(format!("mx-host={d},mx.{d},10"));
        dns.push(format!("address=/mx.{d}/127.0.0.1"));
        dns.push(format!("address=/mta-sts.{d}/127.0.0.1"));
        dns.push(format!("txt-record=_mta-sts.{d},\"v=STSv1; id=20261128;\""));
    }
    let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
    let (_dns, dns_port) = dnsmasq(dir.path(), &dns);
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {}\nmta_sts_port = {https_port}\ntls_ca_file = \"{}\"\n",
            postfix.port,
            cert.ca.display()
        ),
    );
    let ids: Vec<String> = domains
        .iter()
        .map(|d| send(addr, &[&format!("ana@{d}")], d))
        .collect();

    // enforce, MX named, certificate valid for it: delivered over TLS.
    let good = only_file(&postfix.vmail.join("good"), Duration::from_secs(60));
    assert!(
        good.contains("Subject: good.test") && good.contains("(using TLSv1.3"),
        "{good}"
    );
    https.wait_for(
        "GET mta-sts.good.test /.well-known/mta-sts.txt",
        Duration::from_secs(5),
    );
    // enforce, the MX is not in the policy: waits, never tried.
    let bad = serve.wait_for_line(&["delivery deferred", &ids[1]], Duration::from_secs(30));
    assert!(
        bad.contains("4.7.5") && bad.contains("named in its MTA-STS policy"),
        "{bad}"
    );
    // enforce, the MX is named but its certificate is not for it: waits.
    let badcert = serve.wait_for_line(&["delivery deferred", &ids[2]], Duration::from_secs(30));
    assert!(badcert.contains("4.7.5"), "{badcert}");
    // testing: delivered anyway, and the mismatch is logged.
    let tried = only_file(&postfix.vmail.join("try"), Duration::from_secs(30));
    assert!(tried.contains("Subject: try.test"), "{tried}");
    serve.wait_for_line(
        &["MX not in the domain's MTA-STS policy", "mx.try.test"],
        Duration::from_secs(5),
    );
    for d in ["bad", "badcert"] {
        assert!(
            wait_maildir(&postfix.vmail.join(d), 1, Duration::from_millis(200)).is_empty(),
            "nothing reached {d}"
        );
    }
}

/// An alias that forwards to another domain (Postfix's
/// `virtual_alias_maps`): the local target gets the message with its
/// sender, the remote one through its real MX with an SRS sender at the
/// alias's domain; a bounce the remote MX sends to that SRS address comes
/// back through Correu to the original sender; a forged SRS address and a
/// local target without a mailbox are refused.
#[test]
fn an_alias_forwards_to_another_domain_with_srs_and_bounces_find_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let correu_port = free_port();
    // Postfix is the MX of remote.test and of signed.test (where the
    // original sender lives); it takes mail for gone@remote.test and
    // bounces it after one failed attempt (its next hop is a closed port,
    // and nothing waits in its queue), and sends mail for fwd.test to
    // Correu.
    let postfix = Postfix::start(
        &dir.path().join("postfix"),
        &format!(
            "virtual_mailbox_domains = remote.test, signed.test\nvirtual_mailbox_base = {{VMAIL}}\n\
             virtual_mailbox_maps = inline:{{ana@remote.test=ana/, gone@remote.test=gone/, jo@signed.test=jo/}}\n\
             virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_transport = virtual\n\
             transport_maps = inline:{{gone@remote.test=smtp:[127.0.0.1]:1, fwd.test=smtp:[127.0.0.1]:{correu_port}}}\n\
             smtp_tls_security_level = none\nmaximal_queue_lifetime = 0\nbounce_queue_lifetime = 0\n"
        ),
    );
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=remote.test,mx.remote.test,10",
            "mx-host=signed.test,mx.remote.test,10",
            "address=/mx.remote.test/127.0.0.1",
        ],
    );
    std::fs::write(
        dir.path().join("aliases"),
        "mix@fwd.test: pere@fwd.test, ana@remote.test\nbye@fwd.test: gone@remote.test\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("srs.secret"),
        "a secret of 32 characters, or so\n",
    )
    .unwrap();
    // fwd.test's DKIM key seals what its aliases forward (ARC).
    let key = dir.path().join("fwd.pem");
    let record = dkim_rsa_key(&key);
    let cfg = dir.path().join("f.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.fwd.test\"\ndomains = [\"fwd.test\"]\n\
             [smtp]\nlisten = [\"127.0.0.1:{correu_port}\"]\ntrusted_networks = []\n\
             [storage]\nlisten = \"127.0.0.1:0\"\nroot = \"f-mail\"\naliases_file = \"{d}/aliases\"\nsrs_secret_file = \"{d}/srs.secret\"\n\
             [queue]\nspool = \"f-queue\"\nretry_delays = [\"1m\"]\n\
             [dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {}\n\
             [delivery.dkim.\"fwd.test\"]\nselector = \"s1\"\nkey_file = \"{}\"\n",
            postfix.port,
            key.display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "f", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();

    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.signed.test");
    let id = queue_id(&c.send_mail(
        "jo@signed.test",
        &["mix@fwd.test"],
        "From: jo@signed.test\r\nSubject: forwarded\r\n\r\nfor the alias\r\n",
    ));
    // A forged SRS address, and one whose hash is right but for another
    // secret, lead nowhere: no open relay.
    c.cmd("MAIL FROM:<>");
    let forged = c.cmd("RCPT TO:<SRS0=abcd=AA=victim.test=x@fwd.test>");
    assert_eq!(forged.code, 550, "{forged}");
    c.cmd("RSET");
    c.cmd("QUIT");

    // The local target: the original sender.
    let local = only_file(
        &dir.path().join("f-mail/fwd.test/pere"),
        Duration::from_secs(30),
    );
    assert!(
        local.starts_with("Return-Path: <jo@signed.test>\r\n") && local.contains("for the alias"),
        "{local}"
    );
    // The remote one: at Postfix, from the SRS address at fwd.test.
    let remote = only_file(&postfix.vmail.join("ana"), Duration::from_secs(60));
    let return_path = remote
        .lines()
        .find_map(|l| l.strip_prefix("Return-Path: <"))
        .and_then(|l| l.strip_suffix('>'))
        .unwrap_or_else(|| panic!("no Return-Path: {remote}"))
        .to_string();
    assert!(
        return_path.starts_with("SRS0=") && return_path.ends_with("=signed.test=jo@fwd.test"),
        "{return_path}"
    );
    assert!(
        remote.contains(&format!("id {id}")),
        "one queue id: {remote}"
    );
    // Sealed with ARC by fwd.test (RFC 8617): the seal and the message
    // signature verify with dkimpy, and the results it carries are ours.
    assert!(
        remote.contains("ARC-Seal: i=1;") && remote.contains("d=fwd.test"),
        "{remote}"
    );
    assert!(
        remote.contains("ARC-Authentication-Results: i=1; mx.fwd.test"),
        "{remote}"
    );
    let script = format!(
        "import sys,dkim\nmsg=sys.stdin.buffer.read()\nrec={record:?}.encode()\n\
         cv,res,why=dkim.arc_verify(msg,dnsfunc=lambda name,timeout=5: rec)\nprint(cv.decode(), why)\n"
    );
    let crlf = remote.replace("\r\n", "\n").replace('\n', "\r\n");
    let (_, out, err) = run_with_stdin(&python(), &["-c", &script], &crlf);
    assert!(out.starts_with("pass"), "ARC: {out} {err}\n{remote}");

    // Postfix bounces mail for gone@ to the SRS address it was sent from;
    // Correu takes the bounce and relays it to jo@signed.test.
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.signed.test");
    c.send_mail(
        "jo@signed.test",
        &["bye@fwd.test"],
        "From: jo@signed.test\r\nSubject: to be bounced\r\n\r\nnobody reads this\r\n",
    );
    c.cmd("QUIT");
    let bounce = only_file(&postfix.vmail.join("jo"), Duration::from_secs(90));
    assert!(
        bounce.contains("Return-Path: <>") && bounce.contains("MAILER-DAEMON@postfix.test"),
        "the bounce reached the original sender: {bounce}"
    );
    assert!(bounce.contains("Subject: to be bounced"), "{bounce}");
    serve.wait_for(
        "SRS address: forwarding to the original sender",
        Duration::from_secs(1),
    );

    // `correu alias add` refuses a local target that leads nowhere and
    // takes a remote one.
    let (st, _, err) = run(
        CORREU,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "alias",
            "add",
            "x@fwd.test",
            "ghost@fwd.test",
        ],
    );
    // fwd.test has no accounts file: every local part has a mailbox.
    assert!(st.success(), "{err}");
    let _ = std::fs::write(dir.path().join("accounts"), "pere@fwd.test:\n");
    let cfg2 = dir.path().join("f2.toml");
    std::fs::write(
        &cfg2,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "aliases_file",
            &format!(
                "accounts_file = \"{}/accounts\"\naliases_file",
                dir.path().display()
            ),
        ),
    )
    .unwrap();
    let (st, _, err) = run(
        CORREU,
        &[
            "--config",
            cfg2.to_str().unwrap(),
            "alias",
            "add",
            "y@fwd.test",
            "ghost@fwd.test",
        ],
    );
    assert!(
        !st.success() && err.contains("ghost@fwd.test has no mailbox"),
        "{err}"
    );
    let (st, out, err) = run(
        CORREU,
        &[
            "--config",
            cfg2.to_str().unwrap(),
            "alias",
            "add",
            "y@fwd.test",
            "pere@fwd.test",
            "c@remote.test",
        ],
    );
    assert!(st.success(), "{err}");
    assert!(
        out.contains("y@fwd.test: pere@fwd.test, c@remote.test"),
        "{out}"
    );
}

/// More deliveries to one host than `max_connections_per_host` at once:
/// those over the limit take the connections the others put back, and
/// none waits for a kept connection to go idle (before, they waited for
/// `connection_idle` or went to a retry tier).
#[test]
fn deliveries_over_the_per_host_limit_reuse_the_connections_put_back() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    // Each transaction takes Postfix a second (a pause at RCPT), so the
    // twelve deliveries are under way together.
    let postfix = remote_postfix_with(dir.path(), &cert, "smtpd_recipient_restrictions = sleep 1");
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\nconcurrency = 16\nmax_connections_per_host = 2\nconnection_idle = \"5m\"\n\
             [delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
            postfix.port
        ),
    );
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    for i in 0..12 {
        c.send_mail(
            "jo@localhost",
            &["ana@remote.test"],
            &format!("Subject: burst {i}\r\n\r\nbody {i}\r\n"),
        );
    }
    c.cmd("QUIT");
    let got = wait_maildir(&postfix.vmail.join("ana"), 12, Duration::from_secs(60));
    assert_eq!(got.len(), 12);
    serve.wait_for("delivered", Duration::from_secs(1));
    let log = read(&serve.stdout) + &read(&serve.stderr);
    assert!(
        !log.contains("retry scheduled") && !log.contains("connection limit"),
        "every delivery found a connection: {log}"
    );
    // Postfix saw two connections from Correu (and the one that found
    // it listening).
    let pf = read(&postfix.log);
    assert!(pf.matches(": connect from localhost").count() <= 3, "{pf}");
}

/// A receiver whose TLS offers only CBC ciphers (which rustls does not
/// speak): opportunistic TLS delivers to it in plaintext after the failed
/// handshake, as Postfix's `may` does; a route that requires TLS does not.
#[test]
fn a_failed_opportunistic_handshake_falls_back_to_plaintext_and_required_tls_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix_with(
        dir.path(),
        &cert,
        "smtpd_tls_protocols = !SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3\n\
         smtpd_tls_ciphers = high\ntls_high_cipherlist = AES128-SHA:AES256-SHA:AES128-SHA256:AES256-SHA256",
    );
    let (mut may, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
            postfix.port
        ),
    );
    send(addr, &["ana@remote.test"], "cbc only");
    let got = only_file(&postfix.vmail.join("ana"), Duration::from_secs(30));
    assert!(got.contains("Subject: cbc only"), "{got}");
    assert!(!got.contains("(using TLS"), "plaintext: {got}");
    may.wait_for(
        "STARTTLS handshake failed; delivering in plaintext",
        Duration::from_secs(5),
    );

    let (mut required, addr) = serve(
        dir.path(),
        "b",
        &format!(
            "[delivery.routes.\"remote.test\"]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"required\"\n",
            postfix.port
        ),
    );
    send(addr, &["ana@remote.test"], "required");
    let line = required.wait_for("retry scheduled", Duration::from_secs(30));
    assert!(!line.is_empty());
    let log = read(&required.stdout) + &read(&required.stderr);
    assert!(!log.contains("delivering in plaintext"), "{log}");
    assert_eq!(
        wait_maildir(&postfix.vmail.join("ana"), 1, Duration::from_secs(2)).len(),
        1,
        "nothing more reached Postfix"
    );
}

/// A recipient a real Postfix refuses with `550 5.1.1` is classed an
/// invalid recipient and put on the suppression list (in Redis, shared by
/// delivery processes); the next message to it fails at once, with a
/// bounce that says so and no connection to Postfix. Each attempt has its
/// delivery log line and its event; the operator's command lists, adds
/// and removes.
#[test]
fn a_hard_bounce_suppresses_the_recipient_with_a_log_line_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix(dir.path(), &cert);
    let redis = RedisPrefix::new("suppression");
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "{}[events]\nenabled = true\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n",
            redis.section(),
            postfix.port
        ),
    );
    let cfg = dir.path().join("a.toml");

    // ana is delivered: the log line says where, how and how long.
    let first = send(addr, &["ana@remote.test"], "one");
    let sent = serve.wait_for_line(
        &["\"message\":\"delivered\"", &first],
        Duration::from_secs(30),
    );
    let port = postfix.port;
    for want in [
        "\"status\":\"sent\"",
        "\"dsn\":\"2.0.0\"",
        &format!("\"relay\":\"127.0.0.1[127.0.0.1]:{port}\""),
        "\"tls_version\":\"TLSv1.3\"",
        "\"tls_cipher\":\"TLS13_",
        "\"tls_verify\":\"none\"",
        "\"recipient\":\"ana@remote.test\"",
        "\"conn_use\":1",
        "\"delays\":\"",
    ] {
        assert!(sent.contains(want), "{want} in {sent}");
    }

    // nobody: 550 5.1.1 from Postfix, a bounce, and the list.
    let second = send(addr, &["nobody@remote.test"], "two");
    let failed = serve.wait_for_line(
        &["delivery failed permanently", &second],
        Duration::from_secs(30),
    );
    for want in [
        "\"status\":\"bounced\"",
        "\"class\":\"invalid_recipient\"",
        "\"dsn\":\"5.1.1\"",
        "\"reply\":\"550 5.1.1",
    ] {
        assert!(failed.contains(want), "{want} in {failed}");
    }
    serve.wait_for("recipient suppressed\"", Duration::from_secs(5));
    assert!(redis.exists("suppressed:nobody@remote.test"));
    let listed = correu_cli(CORREU, &cfg, &["suppression", "list"], "");
    assert!(
        listed.contains("nobody@remote.test  invalid_recipient  5.1.1"),
        "{listed}"
    );

    // The next message to nobody fails at once: Postfix never hears of it.
    let refused_before = read(&postfix.log).matches("nobody@remote.test").count();
    let third = send(addr, &["nobody@remote.test"], "three");
    let line = serve.wait_for_line(
        &["recipient suppressed; not attempted", &third],
        Duration::from_secs(30),
    );
    assert!(
        line.contains("\"class\":\"suppressed\"") && line.contains("\"relay\":\"none\""),
        "{line}"
    );
    let bounces = wait_maildir(&maildir(dir.path(), "a", "jo"), 2, Duration::from_secs(30));
    let texts: Vec<String> = bounces.iter().map(|p| read(p)).collect();
    let second_bounce = texts
        .iter()
        .find(|t| t.contains(&format!("X-Correu-Queue-ID: {third}")))
        .expect("a bounce for the suppressed message");
    assert!(
        second_bounce.contains("nobody@remote.test is on the suppression list (invalid_recipient"),
        "{second_bounce}"
    );
    assert!(second_bounce.contains("Status: 5.1.1"), "{second_bounce}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read(&postfix.log).matches("nobody@remote.test").count(),
        refused_before,
        "no connection for a suppressed recipient"
    );

    // Every outcome is an event in the spool, in order (the bounces to
    // jo@localhost have theirs too).
    let events_dir = dir.path().join("a-queue/events");
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = events(&events_dir);
        seen.retain(|e| e.domain == "remote.test");
        if seen.len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let got: Vec<(String, i32, String, String)> = seen
        .iter()
        .map(|e| {
            (
                e.queue_id.clone(),
                e.outcome,
                e.class.clone(),
                e.recipient.clone(),
            )
        })
        .collect();
    use correu_proto::v1::Outcome as O;
    assert_eq!(
        got,
        vec![
            (
                first.clone(),
                O::Delivered as i32,
                String::new(),
                "ana@remote.test".into()
            ),
            (
                second.clone(),
                O::Bounced as i32,
                "invalid_recipient".into(),
                "nobody@remote.test".into()
            ),
            (
                third.clone(),
                O::Suppressed as i32,
                "suppressed".into(),
                "nobody@remote.test".into()
            ),
        ],
        "{seen:?}"
    );
    assert_eq!(seen[0].relay, "127.0.0.1");
    assert_eq!(seen[0].tls_version, "TLSv1.3");
    assert_eq!(seen[1].reply.get(..9), Some("550 5.1.1"));

    // The operator takes nobody off the list, and adds someone else.
    let out = correu_cli(
        CORREU,
        &cfg,
        &["suppression", "remove", "Nobody@remote.test"],
        "",
    );
    assert!(out.contains("nobody@remote.test removed"), "{out}");
    assert!(!redis.exists("suppressed:nobody@remote.test"));
    correu_cli(
        CORREU,
        &cfg,
        &[
            "suppression",
            "add",
            "eva@remote.test",
            "--reason",
            "unsubscribed",
            "--ttl",
            "1h",
        ],
        "",
    );
    let listed = correu_cli(CORREU, &cfg, &["suppression", "list"], "");
    assert!(
        listed.contains("1 suppressed recipient(s)")
            && listed.contains("eva@remote.test  manual  5.7.1")
            && listed.contains("unsubscribed"),
        "{listed}"
    );
    let (st, _, err) = run(
        CORREU,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "suppression",
            "remove",
            "nobody@remote.test",
        ],
    );
    assert!(
        !st.success() && err.contains("not on the suppression list"),
        "{err}"
    );
}

/// The delivery events written to `dir` by `correu serve`, in order.
fn events(dir: &Path) -> Vec<correu_proto::v1::DeliveryEvent> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|p| {
            <correu_proto::v1::DeliveryEvent as correu_proto::Message>::decode(
                std::fs::read(p).unwrap().as_slice(),
            )
            .unwrap()
        })
        .collect()
}

/// Sends each `(recipient, subject)` with `MAIL FROM:<jo@localhost>
/// REQUIRETLS` from Python's smtplib over STARTTLS (trusting `ca`), each
/// accepted; first, with `check_clear`, checks that REQUIRETLS is neither
/// offered nor taken in the clear (`530 5.7.10`). The queue ids, in order.
fn send_requiretls(
    port: u16,
    ca: &Path,
    check_clear: bool,
    messages: &[(&str, &str)],
) -> Vec<String> {
    let clear = if check_clear {
        "assert not s.has_extn('requiretls'), 'REQUIRETLS offered in the clear'\n\
         code, text = s.docmd('MAIL FROM:<jo@localhost> REQUIRETLS')\n\
         assert code == 530 and b'5.7.10' in text, (code, text)\n\
         s.rset()\n"
    } else {
        ""
    };
    let list: Vec<String> = messages
        .iter()
        .map(|(r, subject)| format!("({r:?}, {subject:?})"))
        .collect();
    let script = format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP('127.0.0.1', {port})
s.ehlo('py.example')
{clear}s.starttls(context=ssl.create_default_context(cafile={ca:?}))
s.ehlo('py.example')
assert s.has_extn('requiretls'), s.esmtp_features
for rcpt, subject in ({list},):
    s.mail('jo@localhost', ['REQUIRETLS'])
    s.rcpt(rcpt)
    code, text = s.data(('Subject: %s\r\n\r\nbody\r\n' % subject).encode())
    assert code == 250, (code, text)
    print(text.decode().split()[-1])
s.quit()
"#,
        ca = ca.to_str().unwrap(),
        list = list.join(", ")
    );
    let (st, out, err) = run(&python(), &["-c", &script]);
    assert!(st.success(), "{out}{err}");
    let ids: Vec<String> = out.split_whitespace().map(String::from).collect();
    assert_eq!(ids.len(), messages.len(), "{out}");
    ids
}

/// REQUIRETLS (RFC 8689) end to end: a client that asks for it without
/// TLS is refused `530 5.7.10`; under STARTTLS the message goes to a
/// Correu that offers REQUIRETLS, over TLS verified against its CA; one
/// for a real Postfix (STARTTLS, but no REQUIRETLS) is not sent at all
/// and bounces with `5.7.30`, and one for a plaintext-only receiver
/// bounces with `5.7.10`.
#[test]
fn requiretls_goes_only_to_a_verified_host_that_offers_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "tls");
    // Postfix offers STARTTLS but has no REQUIRETLS; aiosmtpd speaks
    // plaintext only.
    let postfix = remote_postfix(dir.path(), &cert);
    let plain_box = dir.path().join("plain");
    let (_plain, plain_port) = aiosmtpd(dir.path(), &plain_box);
    // B: the next hop that offers REQUIRETLS (under TLS).
    let b_cfg = dir.path().join("b.toml");
    std::fs::write(
        &b_cfg,
        format!(
            "domains = [\"b.test\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"b-mail\"\n[queue]\nspool = \"b-queue\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
    .unwrap();
    let mut b = Proc::correu(CORREU, "b", dir.path(), &["serve"], &b_cfg);
    let b_addr = b.serve_smtp_addr();
    // unauth.test's MX is B too, found by plain DNS: no MTA-STS policy
    // names it (and DNSSEC is not validated), so it is not authenticated.
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=unauth.test,localhost.unauth.test,10",
            "address=/localhost.unauth.test/127.0.0.1",
        ],
    );
    // A: takes the client's REQUIRETLS under STARTTLS.
    let a_cfg = dir.path().join("a.toml");
    std::fs::write(
        &a_cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\ntls_certificate = \"{cert}\"\ntls_key = \"{key}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"a-mail\"\n[queue]\nspool = \"a-queue\"\nretry_delays = [\"1m\"]\n[dns]\nserver = \"127.0.0.1:{dns}\"\n[delivery]\nmx_port = {b}\ntls_ca_file = \"{ca}\"\n[delivery.routes]\n\"b.test\" = \"localhost:{b}\"\n\"remote.test\" = \"localhost:{pf}\"\n\"plain.test\" = \"localhost:{plain}\"\n",
            cert = cert.cert.display(),
            key = cert.key.display(),
            ca = cert.ca.display(),
            b = b_addr.port(),
            pf = postfix.port,
            plain = plain_port,
            dns = dns_port
        ),
    )
    .unwrap();
    let mut a = Proc::correu(CORREU, "a", dir.path(), &["serve"], &a_cfg);
    let a_addr = a.serve_smtp_addr();

    let ids = send_requiretls(
        a_addr.port(),
        &cert.ca,
        true,
        &[
            ("ana@b.test", "kept private"),
            ("ana@remote.test", "not to postfix"),
            ("ana@plain.test", "not in the clear"),
            ("ana@unauth.test", "not to an unauthenticated mx"),
        ],
    );

    // To B: delivered, over verified TLS.
    let got = only_file(
        &dir.path().join("b-mail/b.test/ana"),
        Duration::from_secs(30),
    );
    assert!(
        got.contains("Subject: kept private") && got.contains("with ESMTPS"),
        "{got}"
    );
    // To Postfix and aiosmtpd: never sent, and the sender learns why.
    let bounces = wait_maildir(&maildir(dir.path(), "a", "jo"), 3, Duration::from_secs(30));
    let texts: Vec<String> = bounces.iter().map(|p| read(p)).collect();
    for (id, status) in [
        (&ids[1], "5.7.30"),
        (&ids[2], "5.7.10"),
        (&ids[3], "5.7.10"),
    ] {
        let bounce = texts
            .iter()
            .find(|t| t.contains(&format!("X-Correu-Queue-ID: {id}")))
            .unwrap_or_else(|| panic!("a bounce for {id}: {texts:?}"));
        assert!(
            bounce.contains(&format!("Status: {status}")) && bounce.contains("REQUIRETLS"),
            "{status}: {bounce}"
        );
    }
    assert!(
        wait_maildir(&plain_box, 0, Duration::ZERO).is_empty(),
        "nothing sent in the clear"
    );
    let unauth = texts
        .iter()
        .find(|t| t.contains(&format!("X-Correu-Queue-ID: {}", ids[3])))
        .unwrap();
    assert!(
        unauth.contains("is authenticated (by an MTA-STS policy"),
        "{unauth}"
    );
    // Refused before any connection: B never heard of unauth.test.
    assert!(
        !read(&b.stderr).contains("unauth.test"),
        "B was not given the message"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !read(&postfix.log).contains("not to postfix")
            && !read(&postfix.log).contains("from=<jo@localhost>"),
        "Postfix was given no transaction"
    );
    drop(a);
    drop(b);
}

/// A destination that says to slow down is left alone, and only it: a
/// real Postfix limiting Correu to one message a minute answers the second
/// MAIL with `450 4.7.1 Error: too much mail` (classed rate_limited); the
/// next message to it waits without a connection, while a message to
/// another destination goes at once.
#[test]
fn a_destination_that_says_slow_down_is_held_off_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "mx");
    let postfix = remote_postfix_with(
        dir.path(),
        &cert,
        "smtpd_client_event_limit_exceptions =\nsmtpd_client_message_rate_limit = 1\nanvil_rate_time_unit = 60s",
    );
    let other_box = dir.path().join("other");
    let (_other, other_port) = aiosmtpd(dir.path(), &other_box);
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[delivery]\nconnection_idle = \"0s\"\n[delivery.routes]\n\"remote.test\" = \"localhost:{}\"\n\"other.test\" = \"127.0.0.1:{other_port}\"\n",
            postfix.port
        ),
    );
    let first = send(addr, &["ana@remote.test"], "one");
    serve.wait_for_line(
        &["\"message\":\"delivered\"", &first],
        Duration::from_secs(30),
    );
    let second = send(addr, &["ana@remote.test"], "two");
    let refused = serve.wait_for_line(
        &["\"message\":\"delivery deferred\"", &second],
        Duration::from_secs(30),
    );
    assert!(
        refused.contains("\"reply\":\"450 4.7.1 Error: too much mail")
            && refused.contains("\"class\":\"rate_limited\""),
        "{refused}"
    );
    let held = serve.wait_for(
        "destination asked to slow down; holding off",
        Duration::from_secs(5),
    );
    assert!(held.contains("\"mx\":\"localhost\""), "{held}");
    let said = read(&postfix.log)
        .matches("Message delivery request rate limit exceeded")
        .count();
    assert_eq!(said, 1, "{}", read(&postfix.log));

    // The next message to Postfix waits without a connection...
    let third = send(addr, &["ana@remote.test"], "three");
    let waited = serve.wait_for_line(
        &["\"message\":\"delivery deferred\"", &third],
        Duration::from_secs(30),
    );
    assert!(
        waited.contains("asked to slow down; holding off for")
            && waited.contains("\"relay\":\"none\""),
        "{waited}"
    );
    // ... while another destination is not held.
    send(addr, &["bo@other.test"], "four");
    let got = wait_maildir(&other_box, 1, Duration::from_secs(30));
    assert_eq!(got.len(), 1);
    let connects = read(&postfix.log).matches("connect from").count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read(&postfix.log).matches("connect from").count(),
        connects,
        "no connection to the held destination"
    );
}

/// TLS reports (RFC 8460): each session's TLS is counted in Redis per
/// day and policy; the day's report goes to the `rua` a domain publishes
/// in `_smtp._tls` (here a mailbox of Correu's own), and Python's email,
/// gzip and json read it. remote.test has no MTA-STS policy and a real
/// Postfix with STARTTLS (a success); sts.test enforces a policy its MX
/// fails (the certificate is not for mx.sts.test: a failure with the
/// policy's lines).
#[test]
fn tls_reports_count_sessions_and_reach_the_domains_rua() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert_for(dir.path(), "pki", &["localhost", "mta-sts.sts.test"]);
    let postfix = remote_postfix(dir.path(), &cert);
    let (_https, https_port) = mta_sts_server(
        dir.path(),
        &cert,
        &[(
            "mta-sts.sts.test",
            "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n",
        )],
    );
    let (_dns, dns_port) = dnsmasq(
        dir.path(),
        &[
            "mx-host=remote.test,mx.remote.test,10",
            "address=/mx.remote.test/127.0.0.1",
            "txt-record=_smtp._tls.remote.test,\"v=TLSRPTv1; rua=mailto:tlsrpt@localhost\"",
            "mx-host=sts.test,mx.sts.test,10",
            "address=/mx.sts.test/127.0.0.1",
            "address=/mta-sts.sts.test/127.0.0.1",
            "txt-record=_mta-sts.sts.test,\"v=STSv1; id=20261202;\"",
            "txt-record=_smtp._tls.sts.test,\"v=TLSRPTv1; rua=mailto:tlsrpt@localhost\"",
        ],
    );
    let vhost = Vhost::create("tlsrpt");
    let redis = RedisPrefix::new("tlsrpt");
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.correu.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"a-mail\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{url}\"\nretry_delays = [\"1m\"]\n{redis}[dns]\nserver = \"127.0.0.1:{dns_port}\"\n[delivery]\nmx_port = {mx}\nmta_sts_port = {https_port}\ntls_ca_file = \"{ca}\"\n[delivery.tls_reports]\nenabled = true\norganization = \"Correu test\"\n",
            url = vhost.url(RABBITMQ.parse().unwrap()),
            redis = redis.section(),
            mx = postfix.port,
            ca = cert.ca.display()
        ),
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "a", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    send(addr, &["ana@remote.test"], "over tls");
    let sts = send(addr, &["ana@sts.test"], "enforced");
    only_file(&postfix.vmail.join("ana"), Duration::from_secs(30));
    serve.wait_for_line(&["delivery deferred", &sts], Duration::from_secs(30));

    let today = correu_smtp::headers::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    )[..10]
        .to_string();
    let shown = correu_cli(CORREU, &cfg, &["tls-report", "show", "--date", &today], "");
    assert!(
        shown.contains("\"total-successful-session-count\": 1")
            && shown.contains("certificate-host-mismatch"),
        "{shown}"
    );
    let sent = correu_cli(CORREU, &cfg, &["tls-report", "send", "--date", &today], "");
    assert_eq!(
        sent.matches("mailto:tlsrpt@localhost: queued as").count(),
        2,
        "{sent}"
    );

    let reports = wait_maildir(
        &maildir(dir.path(), "a", "tlsrpt"),
        2,
        Duration::from_secs(30),
    );
    assert_eq!(reports.len(), 2);
    let script = r#"
import email, gzip, json, sys
from email import policy
out = {}
for path in sys.argv[1:]:
    msg = email.message_from_binary_file(open(path, 'rb'), policy=policy.default)
    assert msg.get_content_type() == 'multipart/report', msg.get_content_type()
    assert msg.get_param('report-type') == 'tlsrpt', msg.get_param('report-type')
    part = next(p for p in msg.iter_attachments() if p.get_content_type() == 'application/tlsrpt+gzip')
    assert part.get_filename().endswith('.json.gz'), part.get_filename()
    report = json.loads(gzip.decompress(part.get_content()))
    out[msg['TLS-Report-Domain']] = report
print(json.dumps(out))
"#;
    let mut args = vec!["-c", script];
    let paths: Vec<String> = reports
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let (st, out, err) = run(&python(), &args);
    assert!(st.success(), "{out}{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let remote = &got["remote.test"];
    assert_eq!(remote["organization-name"], "Correu test");
    assert_eq!(remote["contact-info"], "postmaster@mx.correu.test");
    assert_eq!(
        remote["date-range"]["start-datetime"],
        format!("{today}T00:00:00Z")
    );
    let p = &remote["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "no-policy-found");
    assert_eq!(p["policy"]["policy-domain"], "remote.test");
    assert_eq!(p["summary"]["total-successful-session-count"], 1);
    assert_eq!(p["summary"]["total-failure-session-count"], 0);
    let s = &got["sts.test"]["policies"][0];
    assert_eq!(s["policy"]["policy-type"], "sts");
    assert_eq!(
        s["policy"]["policy-string"],
        serde_json::json!([
            "version: STSv1",
            "mode: enforce",
            "mx: mx.sts.test",
            "max_age: 86400"
        ])
    );
    assert_eq!(s["policy"]["mx-host"], serde_json::json!(["mx.sts.test"]));
    assert_eq!(s["summary"]["total-successful-session-count"], 0);
    let f = &s["failure-details"][0];
    assert_eq!(f["result-type"], "certificate-host-mismatch");
    assert_eq!(f["receiving-mx-hostname"], "mx.sts.test");
    assert_eq!(f["receiving-ip"], "127.0.0.1");
    assert!(f["failed-session-count"].as_u64().unwrap() >= 1);
}

/// `openssl … | openssl dgst`: the hex digest of a certificate's DER
/// (`pubkey`: of its SubjectPublicKeyInfo).
fn cert_digest(cert: &Path, pubkey: bool, alg: &str) -> String {
    let der = if pubkey {
        format!(
            "openssl x509 -in '{}' -noout -pubkey | openssl pkey -pubin -outform DER",
            cert.display()
        )
    } else {
        format!("openssl x509 -in '{}' -outform DER", cert.display())
    };
    let (st, out, err) = run("sh", &["-c", &format!("{der} | openssl dgst -{alg} -hex")]);
    assert!(st.success(), "{out}{err}");
    out.trim().rsplit(' ').next().unwrap().to_string()
}

/// DANE (RFC 7672) against a DNSSEC-signed root served by BIND, with its
/// key as the trust anchor, and a real Postfix whose chain holds its CA:
/// - DANE-EE (public key, SHA-256) and DANE-TA (CA certificate, SHA-512)
///   records that match: delivered, the log line says `tls_verify: dane`;
/// - a signed zone without TLSA records, and an unsigned (insecure) zone:
///   opportunistic TLS, as before;
/// - a TLSA record that matches nothing: deferred, nothing sent, even for
///   a domain whose MTA-STS policy (enforce) the certificate satisfies
///   (RFC 8461 §2: MTA-STS never overrides a failing DANE);
/// - an address record changed after signing (bogus): deferred.
#[test]
fn dane_authenticates_mx_hosts_from_signed_tlsa_records() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = [
        "mx.ee.test",
        "mx.ta.test",
        "mx.bad.test",
        "mx.bogus.test",
        "mx.sts.test",
        "mta-sts.sts.test",
    ];
    let cert = test_cert_for(dir.path(), "mx", &hosts);
    // Postfix sends its chain: its certificate, then the CA's.
    let chain = dir.path().join("mx-chain.crt");
    std::fs::write(&chain, read(&cert.cert) + &read(&cert.ca)).unwrap();
    let domains = ["ee", "ta", "nodane", "plain", "bad", "bogus", "sts"];
    let mailboxes: Vec<String> = domains
        .iter()
        .map(|d| format!("ana@{d}.test={d}/"))
        .collect();
    let postfix = Postfix::start(
        &dir.path().join("postfix"),
        &format!(
            "virtual_mailbox_domains = {}\nvirtual_mailbox_base = {{VMAIL}}\nvirtual_mailbox_maps = inline:{{{}}}\nvirtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\nvirtual_transport = virtual\nsmtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\n",
            domains.map(|d| format!("{d}.test")).join(" "),
            mailboxes.join(", "),
            chain.display(),
            cert.key.display()
        ),
    );
    let p = postfix.port;
    let ee = cert_digest(&cert.cert, true, "sha256");
    let ta = cert_digest(&cert.ca, false, "sha512");
    let mut signed: Vec<String> = Vec::new();
    for d in ["ee", "ta", "nodane", "bad", "bogus", "sts"] {
        signed.push(format!("{d}.test. MX 10 mx.{d}.test."));
        // bogus's address is changed after signing (below).
        let ip = if d == "bogus" {
            "127.0.0.9"
        } else {
            "127.0.0.1"
        };
        signed.push(format!("mx.{d}.test. A {ip}"));
    }
    signed.push(format!("_{p}._tcp.mx.ee.test. TLSA 3 1 1 {ee}"));
    signed.push(format!("_{p}._tcp.mx.ta.test. TLSA 2 0 2 {ta}"));
    signed.push(format!(
        "_{p}._tcp.mx.bad.test. TLSA 3 1 1 {}",
        "ab".repeat(32)
    ));
    signed.push(format!("_{p}._tcp.mx.bogus.test. TLSA 3 1 1 {ee}"));
    // sts.test: an MTA-STS policy its MX's certificate satisfies, and a
    // TLSA record it does not.
    signed.push(format!(
        "_{p}._tcp.mx.sts.test. TLSA 3 1 1 {}",
        "cd".repeat(32)
    ));
    signed.push("_mta-sts.sts.test. TXT \"v=STSv1; id=1;\"".into());
    signed.push("mta-sts.sts.test. A 127.0.0.1".into());
    let (_https, https_port) = mta_sts_server(
        dir.path(),
        &cert,
        &[(
            "mta-sts.sts.test",
            "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n",
        )],
    );
    let plain = [
        "@ MX 10 mx.plain.test.".to_string(),
        "mx A 127.0.0.1".into(),
    ];
    let dns = signed_dns(dir.path(), &signed, &[("plain.test", &plain)], &|zone| {
        zone.lines()
            .map(|l| {
                if l.starts_with("mx.bogus.test.") && l.ends_with("127.0.0.9") {
                    l.replace("127.0.0.9", "127.0.0.1")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    // Correu asks a forwarder that validates nothing, as in a cluster.
    let (_forwarder, forwarder_port) = dns.forwarder(dir.path());
    let (mut serve, addr) = serve(
        dir.path(),
        "a",
        &format!(
            "[dns]\nserver = \"127.0.0.1:{}\"\ntrust_anchor = \"{}\"\n[delivery]\nmx_port = {p}\ntls = \"dane\"\nmta_sts_port = {https_port}\ntls_ca_file = \"{}\"\n",
            forwarder_port,
            dns.anchor.display(),
            cert.ca.display()
        ),
    );
    let rcpts: Vec<String> = domains.iter().map(|d| format!("ana@{d}.test")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let id = send(addr, &rcpts, "dane");

    for (d, verify) in [
        ("ee", "dane"),
        ("ta", "dane"),
        ("nodane", "none"),
        ("plain", "none"),
    ] {
        let line = serve.wait_for_line(
            &[
                "\"message\":\"delivered\"",
                &id,
                &format!("\"recipient\":\"ana@{d}.test\""),
            ],
            Duration::from_secs(30),
        );
        assert!(
            line.contains(&format!("\"tls_verify\":\"{verify}\"")),
            "{d}: {line}"
        );
        let got = only_file(&postfix.vmail.join(d), Duration::from_secs(10));
        assert!(got.contains("(using TLSv1.3"), "{d} over TLS: {got}");
    }
    for (d, dsn, why) in [
        ("bad", "4.7.5", "no TLSA record matches"),
        ("sts", "4.7.5", "no TLSA record matches"),
        ("bogus", "4.4.3", "failed DNSSEC validation"),
    ] {
        let line = serve.wait_for_line(
            &[
                "\"message\":\"delivery deferred\"",
                &id,
                &format!("\"recipient\":\"ana@{d}.test\""),
            ],
            Duration::from_secs(30),
        );
        assert!(
            line.contains(&format!("\"dsn\":\"{dsn}\"")) && line.contains(why),
            "{d}: {line}"
        );
        assert!(
            wait_maildir(&postfix.vmail.join(d), 1, Duration::from_millis(200)).is_empty(),
            "nothing reached {d}"
        );
    }
    drop(dns);
}

/// REQUIRETLS (RFC 8689 §4.2.1) where delivery validates DNSSEC: an MX
/// proven by DNSSEC, authenticated by its TLSA record, gets the message;
/// an MX from an unsigned zone is not authenticated, and the message
/// bounces without a connection.
#[test]
fn requiretls_goes_to_a_dnssec_mx_authenticated_by_dane() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_cert(dir.path(), "b");
    // B: the MX of both domains, offering REQUIRETLS under STARTTLS.
    let b_cfg = dir.path().join("b.toml");
    std::fs::write(
        &b_cfg,
        format!(
            "domains = [\"rt.test\", \"weak.test\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"b-mail\"\n[queue]\nspool = \"b-queue\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
    .unwrap();
    let mut b = Proc::correu(CORREU, "b", dir.path(), &["serve"], &b_cfg);
    let b_port = b.serve_smtp_addr().port();
    let spki = cert_digest(&cert.cert, true, "sha256");
    let signed = [
        "rt.test. MX 10 mx.rt.test.".to_string(),
        "mx.rt.test. A 127.0.0.1".into(),
        format!("_{b_port}._tcp.mx.rt.test. TLSA 3 1 1 {spki}"),
    ];
    let weak = ["@ MX 10 mx.weak.test.".to_string(), "mx A 127.0.0.1".into()];
    let dns = signed_dns(dir.path(), &signed, &[("weak.test", &weak)], &|z| z);
    let a_cfg = dir.path().join("a.toml");
    std::fs::write(
        &a_cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"a-mail\"\n[queue]\nspool = \"a-queue\"\nretry_delays = [\"1m\"]\n[dns]\nserver = \"127.0.0.1:{}\"\ntrust_anchor = \"{}\"\n[delivery]\nmx_port = {b_port}\ntls = \"dane\"\n",
            cert.cert.display(),
            cert.key.display(),
            dns.port,
            dns.anchor.display()
        ),
    )
    .unwrap();
    let mut a = Proc::correu(CORREU, "a", dir.path(), &["serve"], &a_cfg);
    let addr = a.serve_smtp_addr();
    let ids = send_requiretls(
        addr.port(),
        &cert.ca,
        false,
        &[
            ("ana@rt.test", "over dane"),
            ("ana@weak.test", "not to an insecure mx"),
        ],
    );

    let got = only_file(
        &dir.path().join("b-mail/rt.test/ana"),
        Duration::from_secs(30),
    );
    assert!(
        got.contains("Subject: over dane") && got.contains("with ESMTPS"),
        "{got}"
    );
    let bounce = only_file(&maildir(dir.path(), "a", "jo"), Duration::from_secs(30));
    assert!(
        bounce.contains(&format!("X-Correu-Queue-ID: {}", ids[1]))
            && bounce.contains("Status: 5.7.10")
            && bounce.contains("is authenticated (by an MTA-STS policy or DNSSEC)"),
        "{bounce}"
    );
    assert!(
        !read(&b.stderr).contains("weak.test"),
        "B was not given the message"
    );
    drop(a);
    drop(dns);
}

/// A shaping rule's retry schedule: with retry tiers of 1 s and 1 h, mail
/// to the rule's domain is retried every second (its `retry_delays`), and
/// mail to another domain waits the hour of the second tier. Both
/// destinations answer `451` twice, then take the message.
#[test]
fn a_shaping_rule_sets_its_destination_s_retry_delays() {
    let dir = tempfile::tempdir().unwrap();
    let (fast_dir, slow_dir) = (dir.path().join("fast"), dir.path().join("slow"));
    std::fs::create_dir_all(&fast_dir).unwrap();
    std::fs::create_dir_all(&slow_dir).unwrap();
    let (_fast, fast_port) = flaky_mx(&fast_dir, &fast_dir.join("box"), 2);
    let (_slow, slow_port) = flaky_mx(&slow_dir, &slow_dir.join("box"), 2);
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"a-mail\"\n[queue]\nspool = \"a-queue\"\nretry_delays = [\"1s\", \"1h\"]\n[delivery.routes]\n\"fast.test\" = \"127.0.0.1:{fast_port}\"\n\"slow.test\" = \"127.0.0.1:{slow_port}\"\n[delivery.shaping.fast]\ndomains = [\"fast.test\"]\nretry_delays = [\"1s\"]\n"
        ),
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "a", dir.path(), &["serve"], &cfg);
    let addr = serve.serve_smtp_addr();
    let fast = send(addr, &["ana@fast.test"], "fast");
    let slow = send(addr, &["ana@slow.test"], "slow");

    // fast.test: two refusals, one second apart each, then delivered.
    let got = wait_maildir(&fast_dir.join("box"), 1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "fast.test retried every second");
    serve.wait_for_line(
        &["\"message\":\"delivered\"", &fast],
        Duration::from_secs(5),
    );
    // slow.test: the first retry after 1 s, the second waits an hour.
    let line = serve.wait_for_line(
        &["retry scheduled", &slow, "\"attempts\":2"],
        Duration::from_secs(10),
    );
    assert!(line.contains("3600s"), "the second tier: {line}");
    assert!(
        wait_maildir(&slow_dir.join("box"), 1, Duration::from_secs(2)).is_empty(),
        "slow.test waits"
    );
}
