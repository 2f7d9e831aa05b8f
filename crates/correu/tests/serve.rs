//! `correu serve` end to end: real SMTP clients in, Maildir out.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

/// Writes a config for `correu serve` on port 0 under `dir`, plus `extra`
/// (TOML lines that belong at the top level or in a `[section]`).
fn serve_config(dir: &Path, top: &str, smtp: &str, storage: &str) -> std::path::PathBuf {
    let path = dir.join("correu.toml");
    std::fs::write(
        &path,
        format!(
            "{top}\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp}\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n{storage}\n[queue]\nspool = \"queue\"\n"
        ),
    )
    .unwrap();
    path
}

fn start(dir: &Path, cfg: &Path) -> (Proc, std::net::SocketAddr) {
    let mut p = Proc::correu(CORREU, "serve", dir, &["serve"], cfg);
    let addr = p.serve_smtp_addr();
    (p, addr)
}

#[test]
fn seed_session_lands_in_the_maildir_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(dir.path(), "", "", "");
    let (_serve, addr) = start(dir.path(), &cfg);

    let mut c = Smtp::connect(addr);
    let mut codes = vec![c.read().code];
    for line in [
        "HELO",
        "MAIL FROM: jo@domini.com",
        "RCPT TO: pere@localhost",
        "DATA",
    ] {
        codes.push(c.cmd(line).code);
    }
    let body = "Subject: Prova\r\n\r\nBon dia, món! Això és una prova — 🌍\r\n..a line that starts with a dot\r\nend\r\n";
    c.send(body.as_bytes());
    let queued = c.cmd(".");
    codes.push(queued.code);
    let id = queue_id(&queued);
    assert!(
        queued.to_string().starts_with("250 2.0.0 Ok: queued as "),
        "{queued}"
    );
    codes.push(c.cmd("quit").code);
    assert_eq!(codes, vec![220, 250, 250, 250, 354, 250, 221]);

    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(files.len(), 1, "one message in the Maildir");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.contains(&id),
        "the Maildir name {name} carries the queue id {id}"
    );
    let stored = read(&files[0]);
    assert!(stored.starts_with("Return-Path: <jo@domini.com>\r\nDelivered-To: pere@localhost\r\nReceived: from unknown ([127.0.0.1])\r\n"), "{stored}");
    assert!(stored.contains(&format!("with SMTP id {id}")), "{stored}");
    // The message itself, unstuffed, byte for byte after the trace headers.
    let expected = "Subject: Prova\r\n\r\nBon dia, món! Això és una prova — 🌍\r\n.a line that starts with a dot\r\nend\r\n";
    assert!(stored.ends_with(expected), "{stored:?}");
    assert_eq!(stored.matches("Subject: Prova").count(), 1);
}

#[test]
fn unknown_users_relaying_and_bad_commands_get_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(
        dir.path(),
        "",
        "trusted_networks = []",
        "mailboxes = [\"pere@localhost\"]",
    );
    let (_serve, addr) = start(dir.path(), &cfg);
    let mut c = Smtp::connect(addr);
    assert_eq!(c.read().code, 220);
    let cases: &[(&str, &str)] = &[
        ("EHLO client.example", "250"),
        ("BLAH BLAH", "500 5.5.2"),
        ("MAIL FROM:<jo@domini.com", "501 5.5.4"),
        ("MAIL FROM:<no-domain>", "501 5.1.7"),
        ("RCPT TO:<pere@localhost>", "503 5.5.1"),
        ("MAIL FROM:<jo@domini.com>", "250 2.1.0"),
        ("RCPT TO:<nobody@localhost>", "550 5.1.1"),
        ("RCPT TO:<someone@elsewhere.example>", "550 5.7.1"),
        ("RCPT TO:<bad address@localhost>", "501 5.1.3"),
        ("RCPT TO:<PERE@LOCALHOST>", "250 2.1.5"),
        ("NOOP", "250 2.0.0"),
        ("VRFY pere", "252 2.5.2"),
    ];
    for (cmd, want) in cases {
        let r = c.cmd(cmd);
        assert!(
            r.to_string().starts_with(want),
            "{cmd}: got {r}, want {want}"
        );
    }
    // The session goes on after every error: the message still goes through.
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: after errors\r\n\r\nstill here\r\n");
    let id = queue_id(&c.cmd("."));
    assert_eq!(c.cmd("QUIT").code, 221);
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().contains(&id));
    assert!(!dir.path().join("mail/localhost/nobody").exists());
}

#[test]
fn swaks_with_pipelining_and_python_smtplib_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(dir.path(), "", "", "");
    let (_serve, addr) = start(dir.path(), &cfg);
    let server = addr.to_string();
    let (status, out, err) = run(
        "swaks",
        &[
            "--server",
            &server,
            "--from",
            "jo@domini.com",
            "--to",
            "anna@localhost",
            "--pipeline",
            "--header",
            "Subject: swaks",
            "--body",
            "from swaks",
        ],
    );
    assert!(status.success(), "swaks failed:\n{out}\n{err}");
    assert!(out.contains("<-  250 2.0.0 Ok: queued as"), "{out}");

    let script = format!(
        "import smtplib\ns = smtplib.SMTP('127.0.0.1', {port})\ns.ehlo('py.example')\nassert s.has_extn('pipelining') and s.has_extn('size')\nrefused = s.sendmail('jo@domini.com', ['anna@localhost', 'marc@localhost'], 'Subject: smtplib\\r\\n\\r\\nfrom python\\r\\n'.encode())\nassert refused == {{}}, refused\ns.quit()\n",
        port = addr.port()
    );
    let (status, out, err) = run(&python(), &["-c", &script]);
    assert!(status.success(), "smtplib failed:\n{out}\n{err}");

    let anna = wait_maildir(
        &dir.path().join("mail/localhost/anna"),
        2,
        Duration::from_secs(20),
    );
    assert_eq!(anna.len(), 2);
    let texts: Vec<String> = anna.iter().map(|p| read(p)).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Subject: swaks") && t.contains("from swaks"))
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Subject: smtplib") && t.contains("from python"))
    );
    assert_eq!(
        wait_maildir(
            &dir.path().join("mail/localhost/marc"),
            1,
            Duration::from_secs(20)
        )
        .len(),
        1
    );
}

#[test]
fn bad_configuration_stops_the_start_and_names_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "domains = []\nhostnme = \"x\"\n[smtp]\nlisten = [\"nowhere:25\"]\n",
    )
    .unwrap();
    let (status, _, err) = run(CORREU, &["check-config", bad.to_str().unwrap()]);
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(err.contains("smtp.listen[0]"), "{err}");

    std::fs::write(
        &bad,
        "domains = []\nhostnme = \"x\"\n[delivery]\nconcurrency = 0\n",
    )
    .unwrap();
    let (status, _, err) = run(CORREU, &["check-config", bad.to_str().unwrap()]);
    assert_eq!(status.code(), Some(64));
    for key in [
        "hostnme: unknown key",
        "domains: at least one",
        "delivery.concurrency",
    ] {
        assert!(err.contains(key), "missing {key:?} in:\n{err}");
    }

    // serve refuses to start, before binding anything.
    let port = free_port();
    std::fs::write(
        &bad,
        format!("[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nmax_recipients = 0\n"),
    )
    .unwrap();
    let mut p = Proc::correu(CORREU, "serve-bad", dir.path(), &["serve"], &bad);
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(64));
    assert!(p.output().contains("smtp.max_recipients"), "{}", p.output());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "hostname = \"mx.example.org\"\n").unwrap();
    let (status, out, _) = run(CORREU, &["check-config", good.to_str().unwrap()]);
    assert!(status.success());
    assert!(out.contains("ok"));
}

#[test]
fn sigterm_finishes_the_session_in_progress_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(dir.path(), "", "", "");
    let (serve, addr) = start(dir.path(), &cfg);
    let mut c = Smtp::connect(addr);
    assert_eq!(c.read().code, 220);
    assert_eq!(c.cmd("HELO me").code, 250);
    assert_eq!(c.cmd("MAIL FROM:<jo@domini.com>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<pere@localhost>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: in flight\r\n\r\n");
    serve.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    // The message in progress is still taken and queued.
    c.send(b"body\r\n");
    let id = queue_id(&c.cmd("."));
    // Then the idle session is told the server is going away.
    let r = c.read();
    assert!(r.to_string().starts_with("421 4.3.2"), "{r}");
    let mut serve = serve;
    assert!(
        serve.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        serve.output()
    );
    // Accepted means kept: delivered before the exit, or at the next start.
    let (_again, _) = start(dir.path(), &cfg);
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(files.len(), 1);
    assert!(files[0].to_string_lossy().contains(&id));
}

/// The load generator against a real server: every message it counts was
/// answered 250 and is in the Maildir it watched, and its report says so.
#[test]
fn correu_bench_reports_what_the_server_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(dir.path(), "", "", "");
    let (_serve, addr) = start(dir.path(), &cfg);
    let new = dir.path().join("mail/localhost/pere/new");
    std::fs::create_dir_all(&new).unwrap();
    let out = std::process::Command::new(CORREU)
        .args(["bench", "--server", &addr.to_string(), "--clients", "4"])
        .args(["--messages", "60", "--size", "2048", "--json", "--watch"])
        .arg(&new)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("\"messages\": 60,"), "{report}");
    assert!(report.contains("\"stored\": 60,"), "{report}");
    assert!(report.contains("\"errors\": {}"), "{report}");
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        60,
        Duration::from_secs(20),
    );
    assert_eq!(files.len(), 60);
    // Each message has the size asked, plus the trace headers storage and
    // ingress add in front.
    let body = read(&files[0]);
    assert!(
        body.len() > 2048 && body.ends_with("\r\n"),
        "{}",
        body.len()
    );
}

/// Mail and queued messages are private whatever the umask: every file
/// `0600`, every directory Correu makes `0700` (Dovecot reads them as the
/// same user).
#[test]
fn mail_and_spool_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = serve_config(dir.path(), "", "", "");
    let (_serve, addr) = start(dir.path(), &cfg);
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    let id = queue_id(&c.send_mail(
        "jo@domini.com",
        &["pere@localhost"],
        "Subject: private\r\n\r\nx\r\n",
    ));
    let files = wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(20),
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert!(files[0].to_string_lossy().contains(&id));
    assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
    for d in [
        "mail",
        "mail/localhost",
        "mail/localhost/pere",
        "mail/localhost/pere/new",
        "mail/localhost/pere/cur",
        "mail/localhost/pere/tmp",
    ] {
        assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
    }
    for d in [
        "queue/journal",
        "queue/active",
        "queue/deferred",
        "queue/parked",
        "queue/tmp",
    ] {
        assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
    }
    let segments: Vec<_> = std::fs::read_dir(dir.path().join("queue/journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segments.is_empty());
    for s in segments {
        assert_eq!(mode(&s), 0o600, "{}", s.display());
    }
}
