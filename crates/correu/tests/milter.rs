//! Milters from Debian, driven by Correu's milter client, each beside a
//! private Postfix using the same milter, with the same results: OpenDKIM
//! signs (the signature verifies), rspamd in milter mode rejects GTUBE
//! with its own reply, marks ham with its headers and rewrites the subject
//! of spam; and a milter that is down gets its default action.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

fn serve(dir: &Path, milters: &str) -> (Proc, SocketAddr) {
    let cfg = dir.join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"mx.correu.test\"\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\ntrusted_networks = []\n\
             [inbound]\nverify = false\n{milters}\n\
             [storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n"
        ),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, "serve", dir, &["serve"], &cfg);
    let addr = p.serve_smtp_addr();
    (p, addr)
}

fn send(addr: SocketAddr, from: &str, body: &str) -> correu_smtp::Reply {
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.signed.test");
    let r = c.send_mail(from, &["pere@localhost"], body);
    c.cmd("QUIT");
    r
}

fn stored(dir: &Path, subject: &str) -> String {
    stored_in(&dir.join("mail/localhost/pere"), subject)
}

/// The message with this subject in a Maildir, waiting up to 30 s for it.
fn stored_in(maildir: &Path, subject: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let files = wait_maildir(maildir, 1, Duration::from_secs(1));
        if let Some(t) = files.iter().map(|f| read(f)).find(|t| {
            t.contains(&format!("Subject: {subject}\r\n"))
                || t.contains(&format!("Subject: {subject}\n"))
        }) {
            return t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{subject} not stored in {}",
            maildir.display()
        );
    }
}

/// A private Postfix handing the same mail to the same milter, for the
/// comparison: `pere@localhost` is a Maildir under `postfix.vmail`.
fn postfix_with_milter(dir: &Path, milter_port: u16) -> Postfix {
    Postfix::start(
        &dir.join("postfix"),
        &format!(
            "virtual_mailbox_domains = localhost\nvirtual_mailbox_base = {{VMAIL}}\n\
             virtual_mailbox_maps = inline:{{pere@localhost=pere/}}\n\
             virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\n\
             virtual_transport = virtual\nsmtpd_milters = inet:127.0.0.1:{milter_port}\n\
             milter_default_action = tempfail\n"
        ),
    )
}

fn postfix_addr(pf: &Postfix) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], pf.port))
}

/// The value of the first field `name` in a stored message (unfolded).
fn field(msg: &str, name: &str) -> Option<String> {
    let (head, _) = msg
        .split_once("\r\n\r\n")
        .or_else(|| msg.split_once("\n\n"))?;
    let mut lines = head.lines().peekable();
    while let Some(l) = lines.next() {
        if let Some((n, v)) = l.split_once(':')
            && n.eq_ignore_ascii_case(name)
        {
            let mut v = v.trim().to_string();
            while lines.peek().is_some_and(|n| n.starts_with([' ', '\t'])) {
                v.push(' ');
                v.push_str(lines.next().unwrap_or_default().trim());
            }
            return Some(v);
        }
    }
    None
}

/// Debian's rspamd as a milter (its proxy worker, scanning by itself) on
/// a port of its own, with no network to ask: DNS goes to a closed port,
/// fuzzy checks are off. Its headers (X-Spamd-Result, X-Rspamd-Action)
/// go on every message, local or not, and a rule of ours scores mail
/// carrying `X-Correu-Test: spammy` at 9, which rewrites the subject.
fn rspamd(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let conf = dir.join("rspamd");
    for sub in ["local.d", "override.d", "db", "run", "log"] {
        std::fs::create_dir_all(conf.join(sub)).unwrap();
    }
    let files = [
        (
            "local.d/worker-proxy.inc",
            format!(
                "bind_socket = \"127.0.0.1:{port}\";\nmilter = yes;\ntimeout = 60s;\ncount = 1;\n\
                 upstream \"local\" {{ default = yes; self_scan = yes; }}\n"
            ),
        ),
        ("override.d/worker-normal.inc", "enabled = false;\n".into()),
        (
            "override.d/worker-controller.inc",
            "enabled = false;\n".into(),
        ),
        ("override.d/worker-fuzzy.inc", "enabled = false;\n".into()),
        ("local.d/fuzzy_check.conf", "enabled = false;\n".into()),
        (
            "local.d/options.inc",
            format!(
                "dns {{ nameserver = [\"127.0.0.1:{}\"]; timeout = 0.2s; retransmits = 1; }}\n",
                ClosedPort::new().port
            ),
        ),
        (
            "local.d/logging.inc",
            "type = \"console\"; level = \"warning\";\n".into(),
        ),
        (
            "local.d/milter_headers.conf",
            "use = [\"x-spamd-result\", \"x-rspamd-queue-id\", \"x-spam-status\"];\n\
             extended_spam_headers = true;\nskip_local = false;\nskip_authenticated = false;\n"
                .into(),
        ),
        (
            "local.d/actions.conf",
            "reject = 15;\nadd_header = 6;\nrewrite_subject = 8;\ngreylist = null;\n\
             subject = \"[SPAM] %s\";\n\
             quarantine { flags = [\"no_threshold\"]; }\n\
             discard { flags = [\"no_threshold\"]; }\n"
                .into(),
        ),
        (
            "rspamd.local.lua",
            "rspamd_config.CORREU_TEST_SPAMMY = {\n\
               callback = function(task)\n\
                 local h = task:get_header('X-Correu-Test')\n\
                 return h ~= nil and h:find('spammy') ~= nil\n\
               end,\n\
               score = 9.0,\n\
               description = 'Correu test rule',\n\
               group = 'correu',\n\
             }\n\
             rspamd_config:register_symbol({\n\
               name = 'CORREU_TEST_ACTION',\n\
               type = 'prefilter',\n\
               callback = function(task)\n\
                 local h = task:get_header('X-Correu-Action')\n\
                 if h then task:set_pre_result(h, 'Correu test: ' .. h) end\n\
               end,\n\
             })\n"
                .into(),
        ),
    ];
    for (name, text) in files {
        std::fs::write(conf.join(name), text).unwrap();
    }
    let var = |k: &str, sub: &str| format!("{k}={}", conf.join(sub).display());
    let p = Proc::spawn_group(
        "rspamd",
        dir,
        "rspamd",
        &[
            "-f",
            "-i",
            "-c",
            "/etc/rspamd/rspamd.conf",
            "--var",
            &format!("LOCAL_CONFDIR={}", conf.display()),
            "--var",
            &var("DBDIR", "db"),
            "--var",
            &var("RUNDIR", "run"),
            "--var",
            &var("LOGDIR", "log"),
        ],
        &[],
    );
    // rspamd compiles its rules before it listens: tens of seconds on a
    // busy machine.
    wait_port(port, Duration::from_secs(240), &p);
    (p, port)
}

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

#[test]
fn rspamd_in_milter_mode_gives_the_same_verdicts_through_correu_as_through_postfix() {
    let dir = tempfile::tempdir().unwrap();
    let (_rspamd, port) = rspamd(dir.path());
    let pf = postfix_with_milter(dir.path(), port);
    let (mut p, addr) = serve(
        dir.path(),
        &format!("[[inbound.milters]]\nname = \"rspamd\"\naddress = \"127.0.0.1:{port}\"\n"),
    );
    for (server, name) in [(addr, "correu"), (postfix_addr(&pf), "postfix")] {
        // GTUBE: rspamd's reject, with its own reply text.
        let gtube = format!("From: <jo@a.test>\r\nSubject: gtube\r\n\r\n{GTUBE}\r\n");
        let r = send(server, "jo@a.test", &gtube);
        assert_eq!(r.to_string(), "554 5.7.1 Gtube pattern", "{name}");
        // Ham gets rspamd's headers and no action.
        let ham = format!(
            "From: Jo <jo@a.test>\r\nTo: pere@localhost\r\nSubject: ham via {name}\r\n\
             Message-ID: <ham.{name}@a.test>\r\n\r\nHello there.\r\n"
        );
        assert_eq!(send(server, "jo@a.test", &ham).code, 250, "{name}");
        // Spammy (our rule): rspamd rewrites the subject through the milter.
        let spammy = format!(
            "From: Jo <jo@a.test>\r\nTo: pere@localhost\r\nSubject: offer via {name}\r\n\
             X-Correu-Test: spammy\r\nMessage-ID: <spam.{name}@a.test>\r\n\r\nBuy now.\r\n"
        );
        assert_eq!(send(server, "jo@a.test", &spammy).code, 250, "{name}");
        // rspamd's other actions, forced by a test rule: soft reject is a
        // tempfail; discard and quarantine are taken.
        let forced = |action: &str| {
            format!(
                "From: <jo@a.test>\r\nSubject: {action} via {name}\r\n\
                 X-Correu-Action: {action}\r\n\r\nHi.\r\n"
            )
        };
        let r = send(server, "jo@a.test", &forced("soft reject"));
        assert_eq!(r.code, 451, "{name}: {r}");
        assert!(r.to_string().starts_with("451 4.7.1 "), "{name}: {r}");
        assert_eq!(
            send(server, "jo@a.test", &forced("discard")).code,
            250,
            "{name}"
        );
        assert_eq!(
            send(server, "jo@a.test", &forced("quarantine")).code,
            250,
            "{name}"
        );
    }
    // Quarantine: Postfix holds the message in its queue; Correu delivers
    // it into the Junk folder. Discard: neither delivers it.
    p.wait_for("discarded by a milter", Duration::from_secs(5));
    let junk = stored_in(
        &dir.path().join("mail/localhost/pere/.Junk"),
        "quarantine via correu",
    );
    assert!(junk.contains("X-Correu-Action: quarantine"), "{junk}");
    for (maildir, name) in [
        (dir.path().join("mail/localhost/pere"), "correu"),
        (pf.vmail.join("pere"), "postfix"),
    ] {
        let ham = stored_in(&maildir, &format!("ham via {name}"));
        assert_eq!(
            field(&ham, "X-Rspamd-Action").as_deref(),
            Some("no action"),
            "{name}: {ham}"
        );
        let result = field(&ham, "X-Spamd-Result").unwrap_or_default();
        assert!(result.starts_with("default: False ["), "{name}: {ham}");
        let spam = stored_in(&maildir, &format!("[SPAM] offer via {name}"));
        assert_eq!(
            field(&spam, "X-Rspamd-Action").as_deref(),
            Some("rewrite subject"),
            "{name}: {spam}"
        );
        assert!(
            field(&spam, "X-Spamd-Result")
                .unwrap_or_default()
                .contains("CORREU_TEST_SPAMMY(9.00)"),
            "{name}: {spam}"
        );
        assert_eq!(
            spam.matches("Subject:").count(),
            1,
            "{name}: the subject was changed, not added: {spam}"
        );
    }
    let inbox: Vec<String> = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        9,
        Duration::from_secs(1),
    )
    .iter()
    .map(|f| read(f))
    .collect();
    assert!(
        !inbox
            .iter()
            .any(|m| m.contains("X-Correu-Action: discard")
                || m.contains("X-Correu-Action: quarantine")),
        "discarded or quarantined mail in the inbox"
    );
}

#[test]
fn opendkim_signs_through_correu_as_through_postfix_and_both_signatures_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dkim.pem");
    let record = dkim_rsa_key(&key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = free_port();
    let conf = dir.path().join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Syslog no\nMode s\nDomain signed.test\nSelector s1\nKeyFile {}\n\
             Socket inet:{port}@127.0.0.1\nInternalHosts 127.0.0.0/8\n\
             Canonicalization relaxed/simple\nPidFile {}\nUserID root\n\
             RequireSafeKeys no\n",
            key.display(),
            dir.path().join("opendkim.pid").display()
        ),
    )
    .unwrap();
    let dkim = Proc::spawn(
        "opendkim",
        dir.path(),
        "opendkim",
        &["-f", "-x", conf.to_str().unwrap()],
        &[],
    );
    wait_port(port, Duration::from_secs(10), &dkim);
    let (_p, addr) = serve(
        dir.path(),
        &format!("[[inbound.milters]]\nname = \"opendkim\"\naddress = \"127.0.0.1:{port}\"\n"),
    );
    let pf = postfix_with_milter(dir.path(), port);

    // The signature verifies against the key, as dkimpy checks it: the
    // milter saw exactly the bytes that were stored.
    let script = format!(
        "import sys,dkim\nmsg=sys.stdin.buffer.read()\nrec={record:?}.encode()\n\
         ok=dkim.verify(msg,dnsfunc=lambda name,timeout=5: rec)\nprint('verified' if ok else 'failed')\n"
    );
    for (server, maildir, name) in [
        (addr, dir.path().join("mail/localhost/pere"), "correu"),
        (postfix_addr(&pf), pf.vmail.join("pere"), "postfix"),
    ] {
        let body = format!(
            "From: Jo <jo@signed.test>\r\nTo: pere@localhost\r\nSubject: sign me via {name}\r\n\
             Message-ID: <m1.{name}@signed.test>\r\n\r\nA line.\r\n..leading dot, stuffed\r\nlast line\r\n"
        );
        let r = send(server, "jo@signed.test", &body);
        assert_eq!(r.code, 250, "{name}: {r}");
        // Postfix stores LF line ends; the signature is over CRLF.
        let got = stored_in(&maildir, &format!("sign me via {name}"))
            .replace("\r\n", "\n")
            .replace('\n', "\r\n");
        let sig = field(&got, "DKIM-Signature").unwrap_or_default();
        assert!(
            sig.contains("d=signed.test") && sig.contains("s=s1"),
            "{name}: {got}"
        );
        assert!(
            got.contains("\r\n.leading dot, stuffed\r\n"),
            "{name}: the body as sent: {got}"
        );
        // Return-Path and Delivered-To are added after signing; the
        // verifier reads the message as it left the milter.
        let (_, out, err) = run_with_stdin(&python(), &["-c", &script], &got);
        assert_eq!(out.trim(), "verified", "{name}: {err}\n{got}");
    }
}

/// Debian's OpenDMARC, which asks only the system resolver: run with a
/// private resolv.conf naming `dns`. It checks SPF itself and rejects
/// failures of p=reject domains; no host is exempt (its default exempts
/// 127.0.0.1, where every test client is).
fn opendmarc(dir: &Path, dns: std::net::Ipv4Addr) -> (Proc, u16) {
    let port = free_port();
    let conf = dir.join("opendmarc.conf");
    let ignore = dir.join("opendmarc.ignore");
    std::fs::write(&ignore, "192.0.2.1\n").unwrap();
    std::fs::write(
        &conf,
        format!(
            "Socket inet:{port}@127.0.0.1\nAuthservID mx.correu.test\nIgnoreHosts {}\n\
             RejectFailures true\nSPFSelfValidate true\nSPFIgnoreResults true\nSyslog false\n\
             UserID root\nPidFile {}\n",
            ignore.display(),
            dir.join("opendmarc.pid").display()
        ),
    )
    .unwrap();
    let args = with_resolver(dir, dns, "opendmarc", &["-f", "-c", conf.to_str().unwrap()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::spawn_group("opendmarc", dir, "unshare", &args, &[]);
    wait_port(port, Duration::from_secs(20), &p);
    (p, port)
}

#[test]
fn opendmarc_rejects_and_marks_through_correu_as_through_postfix() {
    let dir = tempfile::tempdir().unwrap();
    let (_dns, dns) = dnsmasq_at_53(
        dir.path(),
        &[
            "txt-record=_dmarc.strict.test,\"v=DMARC1; p=reject\"",
            "txt-record=strict.test,\"v=spf1 -all\"",
            "txt-record=_dmarc.fine.test,\"v=DMARC1; p=reject\"",
            "txt-record=fine.test,\"v=spf1 ip4:127.0.0.0/8 -all\"",
        ],
    );
    let (_dmarc, port) = opendmarc(dir.path(), dns);
    let pf = postfix_with_milter(dir.path(), port);
    let (_p, addr) = serve(
        dir.path(),
        &format!("[[inbound.milters]]\nname = \"opendmarc\"\naddress = \"127.0.0.1:{port}\"\n"),
    );
    for (server, maildir, name) in [
        (addr, dir.path().join("mail/localhost/pere"), "correu"),
        (postfix_addr(&pf), pf.vmail.join("pere"), "postfix"),
    ] {
        // From: a p=reject domain, with nothing aligned (SPF passes for
        // another domain, no signature): OpenDMARC's own reply.
        let spoof = "From: <ceo@strict.test>\r\nSubject: pay this\r\n\r\nNow.\r\n";
        assert_eq!(
            send(server, "jo@fine.test", spoof).to_string(),
            "550 5.7.1 rejected by DMARC policy for strict.test",
            "{name}"
        );
        // Aligned SPF: delivered, with OpenDMARC's verdict.
        let fine = format!("From: <jo@fine.test>\r\nSubject: fine via {name}\r\n\r\nHi.\r\n");
        assert_eq!(send(server, "jo@fine.test", &fine).code, 250, "{name}");
        let got = stored_in(&maildir, &format!("fine via {name}"));
        assert!(
            got.contains("Authentication-Results: mx.correu.test; dmarc=pass (p=reject dis=none) header.from=fine.test"),
            "{name}: {got}"
        );
    }
}

/// Every change a milter may make, from purepythonmilter (an independent
/// implementation of the protocol's filter side): recipients added and
/// removed, the sender changed, the body replaced, headers inserted,
/// changed and appended.
#[test]
fn a_milters_changes_to_envelope_headers_and_body_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let script = format!(
        "from purepythonmilter import *\n\
         async def eom(cmd):\n\
         \x20   return Continue(manipulations=[\n\
         \x20       AddRecipient(recipient='<ana@localhost>'),\n\
         \x20       RemoveRecipient(recipient='<pere@localhost>'),\n\
         \x20       ChangeMailFrom(mail_from='<bounces@a.test>'),\n\
         \x20       ReplaceBodyChunk(chunk=b'Replaced by the milter.\\r\\n'),\n\
         \x20       ChangeHeader(headername='Subject', headertext='changed', nth_occurrence=1),\n\
         \x20       InsertHeader(index=0, headername='X-First', headertext='at the top'),\n\
         \x20       AppendHeader(headername='X-Last', headertext='at the end'),\n\
         \x20   ])\n\
         PurePythonMilter(name='changes', hook_on_end_of_message=eom, can_add_headers=True,\n\
         \x20   can_add_recipients=True, can_remove_recipients=True, can_change_mail_from=True,\n\
         \x20   can_change_body=True, can_change_headers=True).run_server(host='127.0.0.1', port={port})\n"
    );
    let milter = Proc::spawn(
        "purepythonmilter",
        dir.path(),
        &python(),
        &["-c", &script],
        &[],
    );
    wait_port(port, Duration::from_secs(20), &milter);
    let (_p, addr) = serve(
        dir.path(),
        &format!("[[inbound.milters]]\nname = \"changes\"\naddress = \"127.0.0.1:{port}\"\n"),
    );
    let body = "From: <jo@a.test>\r\nSubject: original\r\n\r\nThe original body.\r\n";
    assert_eq!(send(addr, "jo@a.test", body).code, 250);
    let got = stored_in(&dir.path().join("mail/localhost/ana"), "changed");
    assert!(
        got.starts_with("Return-Path: <bounces@a.test>\r\n"),
        "{got}"
    );
    assert!(
        got.ends_with("\r\n\r\nReplaced by the milter.\r\n"),
        "{got}"
    );
    let (head, _) = got.split_once("\r\n\r\n").unwrap();
    let names: Vec<&str> = head
        .lines()
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split_once(':').map(|(n, _)| n))
        .collect();
    // Storage and ingress add Return-Path, Delivered-To and Received
    // above what the milter saw.
    let first = names.iter().position(|n| *n == "X-First").unwrap();
    assert_eq!(
        &names[first..],
        ["X-First", "From", "Subject", "X-Last"],
        "{got}"
    );
    assert_eq!(field(&got, "X-Last").as_deref(), Some("at the end"));
    assert!(
        wait_maildir(
            &dir.path().join("mail/localhost/pere"),
            1,
            Duration::from_secs(1)
        )
        .is_empty(),
        "the removed recipient got the message"
    );
}

#[test]
fn a_milter_that_is_down_gets_its_default_action() {
    let dir = tempfile::tempdir().unwrap();
    let dead = ClosedPort::new();
    let (_p, addr) = serve(
        dir.path(),
        &format!(
            "[[inbound.milters]]\nname = \"down\"\naddress = \"127.0.0.1:{}\"\ntimeout = \"2s\"\n",
            dead.port
        ),
    );
    let body = "From: <jo@a.test>\r\nSubject: later\r\n\r\nx\r\n";
    let r = send(addr, "jo@a.test", body);
    assert_eq!(
        r.to_string(),
        "451 4.7.1 Error: content filter unavailable, try again later"
    );
    drop(_p);

    let dir = tempfile::tempdir().unwrap();
    let (_p, addr) = serve(
        dir.path(),
        &format!(
            "[[inbound.milters]]\nname = \"down\"\naddress = \"127.0.0.1:{}\"\ndefault_action = \"accept\"\n",
            dead.port
        ),
    );
    let r = send(addr, "jo@a.test", body);
    assert_eq!(r.code, 250, "{r}");
    assert!(stored(dir.path(), "later").contains("\r\n\r\nx\r\n"));
}

/// A milter that changes what the ARC seal of a forwarded message covers
/// (the Subject) drops the seal; one that only adds a field keeps it, and
/// it still verifies (dkimpy). The seal is in the one queued copy, so the
/// alias's local mailbox shows it.
#[test]
fn an_arc_seal_survives_an_added_field_and_not_a_changed_subject() {
    for (name, manipulation, sealed) in [
        (
            "adds",
            "AppendHeader(headername='X-Scanned', headertext='yes')",
            true,
        ),
        (
            "changes",
            "ChangeHeader(headername='Subject', headertext='changed', nth_occurrence=1)",
            false,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = format!(
            "from purepythonmilter import *\n\
             async def eom(cmd):\n\
             \x20   return Continue(manipulations=[{manipulation}])\n\
             PurePythonMilter(name='{name}', hook_on_end_of_message=eom, can_add_headers=True,\n\
             \x20   can_change_headers=True).run_server(host='127.0.0.1', port={port})\n"
        );
        let milter = Proc::spawn(name, dir.path(), &python(), &["-c", &script], &[]);
        wait_port(port, Duration::from_secs(20), &milter);
        let key = dir.path().join("localhost.pem");
        let record = dkim_rsa_key(&key);
        std::fs::write(
            dir.path().join("aliases"),
            "mix@localhost: pere@localhost, away@remote.test\n",
        )
        .unwrap();
        let closed = ClosedPort::new();
        let cfg = dir.path().join("correu.toml");
        std::fs::write(
            &cfg,
            format!(
                "hostname = \"mx.correu.test\"\n\
                 [smtp]\nlisten = [\"127.0.0.1:0\"]\ntrusted_networks = []\n\
                 [[inbound.milters]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n\
                 [storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\naliases_file = \"{}\"\n\
                 [queue]\nspool = \"queue\"\nretry_delays = [\"10m\"]\n\
                 [delivery.routes]\n\"remote.test\" = \"127.0.0.1:{}\"\n\
                 [delivery.dkim.localhost]\nselector = \"s1\"\nkey_file = \"{}\"\n",
                dir.path().join("aliases").display(),
                closed.port,
                key.display()
            ),
        )
        .unwrap();
        let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
        let addr = serve.serve_smtp_addr();
        let mut c = Smtp::connect(addr);
        c.read();
        c.cmd("EHLO client.signed.test");
        let r = c.send_mail(
            "jo@signed.test",
            &["mix@localhost"],
            "From: <jo@signed.test>\r\nTo: mix@localhost\r\nSubject: sealed?\r\n\
             Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <m@signed.test>\r\n\r\nA body.\r\n",
        );
        assert_eq!(r.code, 250, "{name}: {r}");
        c.cmd("QUIT");
        let files = wait_maildir(
            &dir.path().join("mail/localhost/pere"),
            1,
            Duration::from_secs(30),
        );
        let got = read(&files[0]);
        if sealed {
            assert!(got.contains("X-Scanned: yes"), "{name}: {got}");
            assert!(got.contains("ARC-Seal: i=1;"), "{name}: {got}");
            let script = format!(
                "import sys,dkim\nmsg=sys.stdin.buffer.read()\nrec={record:?}.encode()\n\
                 cv,res,why=dkim.arc_verify(msg,dnsfunc=lambda name,timeout=5: rec)\nprint(cv.decode(), why)\n"
            );
            let (_, out, err) = run_with_stdin(&python(), &["-c", &script], &got);
            assert!(out.starts_with("pass"), "{name}: ARC {out} {err}\n{got}");
        } else {
            assert!(got.contains("Subject: changed"), "{name}: {got}");
            assert!(!got.contains("ARC-Seal"), "{name}: {got}");
            serve.wait_for(
                "a milter changed what the ARC seal covers",
                Duration::from_secs(5),
            );
        }
    }
}
