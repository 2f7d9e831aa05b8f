//! Storage with real neighbours: Dovecot serving the Maildir Correu wrote,
//! with the same accounts file, read by Python's imaplib; SMTP AUTH and
//! the RCPT-time quota answer through storage; two storage processes on
//! one volume.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use correu_proto::v1::DeliverRequest;
use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");
const PASSWORD: &str = "dovecot and correu";

#[test]
fn dovecot_serves_what_correu_stored_to_the_same_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let TestCert { cert, key, .. } = test_cert(dir.path(), "sub");
    let root = dir.path().join("mail");
    let accounts = dir.path().join("accounts");
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "domains = [\"example.org\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\naccounts_file = \"{}\"\naliases_file = \"{}\"\n[queue]\nspool = \"queue\"\n",
            cert.display(),
            key.display(),
            root.display(),
            accounts.display(),
            dir.path().join("aliases").display(),
        ),
    )
    .unwrap();
    // The operator's commands make the files.
    correu_cli(
        CORREU,
        &cfg,
        &["account", "add", "pere@example.org"],
        &format!("{PASSWORD}\n"),
    );
    correu_cli(
        CORREU,
        &cfg,
        &[
            "account",
            "add",
            "tiny@example.org",
            "--quota",
            "1k",
            "--no-password",
        ],
        "",
    );
    correu_cli(
        CORREU,
        &cfg,
        &["alias", "add", "postmaster@example.org", "pere@example.org"],
        "",
    );
    let listed = correu_cli(CORREU, &cfg, &["account", "list"], "");
    assert!(
        listed.contains("pere@example.org  no quota")
            && listed.contains("tiny@example.org  quota 1024 bytes  (no login)"),
        "{listed}"
    );
    let (st, _, err) = run_with_stdin(
        CORREU,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "account",
            "add",
            "pere@example.org",
        ],
        "again\n",
    );
    assert!(
        !st.success() && err.contains("already has an account"),
        "{err}"
    );

    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let l = serve.serve_listeners();
    let find = |role: &str| l.iter().find(|(_, r)| r == role).unwrap().0;
    let (mx, submission) = (find("mx"), find("submission"));

    // To the alias: stored in pere's Maildir.
    let mut c = Smtp::connect(mx);
    c.read();
    c.cmd("EHLO client.example");
    let id = queue_id(&c.send_mail(
        "jo@domini.com",
        &["postmaster@example.org"],
        "Subject: per Dovecot\r\n\r\nBon dia, món!\r\n..a dot line\r\n",
    ));
    // tiny's Maildir++ says it is full (as Dovecot would, after IMAP
    // APPENDs): RCPT gets 452 4.2.2 and the session goes on.
    let tiny = root.join("example.org/tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    std::fs::write(tiny.join("maildirsize"), "1024S\n2048 2\n").unwrap();
    c.cmd("MAIL FROM:<jo@domini.com>");
    let full = c.cmd("RCPT TO:<tiny@example.org>");
    assert_eq!(full.code, 452, "{full:?}");
    assert!(full.to_string().contains("4.2.2"), "{full:?}");
    assert_eq!(c.cmd("RCPT TO:<pere@example.org>").code, 250);
    c.cmd("RSET");
    // With 900 of 1024 bytes used, a message declared at 100 bytes fits
    // and one declared at 200 does not: 452 4.2.2 at RCPT (RFC 1870), as
    // Dovecot's LMTP answers, not a bounce days later.
    std::fs::write(tiny.join("maildirsize"), "1024S\n900 1\n").unwrap();
    c.cmd("MAIL FROM:<jo@domini.com> SIZE=100");
    assert_eq!(c.cmd("RCPT TO:<tiny@example.org>").code, 250);
    c.cmd("RSET");
    c.cmd("MAIL FROM:<jo@domini.com> SIZE=200");
    let over = c.cmd("RCPT TO:<tiny@example.org>");
    assert_eq!(over.code, 452, "{over:?}");
    assert!(over.to_string().contains("4.2.2"), "{over:?}");
    // Without SIZE= the message might fit: taken, as before.
    c.cmd("RSET");
    c.cmd("MAIL FROM:<jo@domini.com>");
    assert_eq!(c.cmd("RCPT TO:<tiny@example.org>").code, 250);
    c.cmd("RSET");
    c.cmd("QUIT");
    // The quota changes (the account made again with 2k): storage rewrites
    // the maildirsize header at once, not at the next delivery.
    correu_cli(CORREU, &cfg, &["account", "del", "tiny@example.org"], "");
    correu_cli(
        CORREU,
        &cfg,
        &[
            "account",
            "add",
            "tiny@example.org",
            "--quota",
            "2k",
            "--no-password",
        ],
        "",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let header = std::fs::read_to_string(tiny.join("maildirsize")).unwrap_or_default();
        if header.starts_with("2048S\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "maildirsize still says {header:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = wait_maildir(&root.join("example.org/pere"), 1, Duration::from_secs(30));
    assert_eq!(stored.len(), 1);
    assert!(
        stored[0].to_string_lossy().contains(&id),
        "{stored:?} holds {id}"
    );
    let bytes = std::fs::read(&stored[0]).unwrap();

    // SMTP AUTH on submission is checked against storage's accounts.
    let sub = submission.to_string();
    let auth = |password: &str| {
        swaks(&[
            "--server",
            &sub,
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "pere@example.org",
            "--auth-password",
            password,
            "--from",
            "pere@example.org",
            "--to",
            "pere@example.org",
            "--quit-after",
            "AUTH",
        ])
    };
    let (ok, out) = auth(PASSWORD);
    assert!(ok && out.contains("235 2.7.0"), "{out}");
    let (ok, out) = auth("wrong");
    assert!(!ok && out.contains("535 5.7.8"), "{out}");

    // Dovecot reads the same Maildir as its own user, with the same
    // accounts file, and serves the message byte for byte.
    let (st, _, err) = run("chown", &["-R", "65534:65534", root.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    // The accounts file is private (0600, as `correu account` makes it);
    // Dovecot's auth process reads it as group dovecot, as an operator
    // would set it up.
    for (cmd, arg) in [("chgrp", "dovecot"), ("chmod", "0640")] {
        let (st, _, err) = run(cmd, &[arg, accounts.to_str().unwrap()]);
        assert!(st.success(), "{cmd}: {err}");
    }
    let (dovecot, imap_port) = dovecot(dir.path(), &accounts, &root);
    let fetched = dir.path().join("fetched.eml");
    let script = format!(
        "import imaplib\n\
         m = imaplib.IMAP4('127.0.0.1', {imap_port})\n\
         m.login('pere@example.org', {PASSWORD:?})\n\
         typ, data = m.select('INBOX')\n\
         assert typ == 'OK' and data[0] == b'1', (typ, data)\n\
         typ, data = m.fetch('1', '(BODY.PEEK[])')\n\
         assert typ == 'OK', (typ, data)\n\
         open({:?}, 'wb').write(data[0][1])\n\
         m.logout()\n",
        fetched.display().to_string()
    );
    let (st, out, err) = run(&python(), &["-c", &script]);
    assert!(st.success(), "imaplib: {out}{err}\n{}", dovecot.output());
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        bytes,
        "IMAP returns the stored message unchanged"
    );
    let (st, out, err) = run(
        &python(),
        &[
            "-c",
            &format!(
                "import imaplib\nm = imaplib.IMAP4('127.0.0.1', {imap_port})\nm.login('pere@example.org', 'wrong')\n"
            ),
        ],
    );
    assert!(
        !st.success() && format!("{out}{err}").contains("AUTHENTICATIONFAILED"),
        "{out}{err}"
    );
    drop(serve);
}

/// Sizes of the messages in a Maildir, by queue id.
fn by_queue_id(maildir: &Path) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(maildir.join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.split('.').nth(1).unwrap().split('_').next().unwrap();
            out.entry(id.to_string())
                .or_default()
                .push(e.metadata().unwrap().len());
        }
    }
    out
}

#[test]
fn two_storage_replicas_on_one_volume_store_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mail");
    let accounts = dir.path().join("accounts");
    std::fs::write(
        &accounts,
        "pere@example.org:::::::userdb_quota_rule=*:storage=1G\nana@example.org:::::::quota=1G\n",
    )
    .unwrap();
    let cfg = dir.path().join("storage.toml");
    std::fs::write(
        &cfg,
        format!(
            "domains = [\"example.org\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\naccounts_file = \"{}\"\n",
            root.display(),
            accounts.display()
        ),
    )
    .unwrap();
    let mut a = Proc::correu(CORREU, "storage-a", dir.path(), &["storage"], &cfg);
    let mut b = Proc::correu(CORREU, "storage-b", dir.path(), &["storage"], &cfg);
    let addrs = [
        a.listening("storage listening"),
        b.listening("storage listening"),
    ];

    let messages = 150;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let clients: Vec<_> = addrs
            .iter()
            .map(|addr| {
                correu_storage::client::connect(
                    &correu_runtime::config::StorageConfig::default(),
                    &format!("http://{addr}"),
                )
                .unwrap()
            })
            .collect();
        // Every message to both mailboxes through both replicas at once:
        // a redelivery racing the first delivery on another pod.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..messages {
            for to in ["pere@example.org", "ana@example.org"] {
                for c in &clients {
                    let mut c = c.clone();
                    let req = DeliverRequest {
                        queue_id: format!("R{i:05}"),
                        sender: "jo@domini.com".into(),
                        recipient: to.into(),
                        content: format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(i * 7))
                            .into_bytes(),
                        received_at_unix_micros: 1_790_000_000_000_000,
                        folder: String::new(),
                    };
                    tasks.spawn(async move { c.deliver(req).await.map(|r| r.into_inner()) });
                }
            }
        }
        let mut fresh = 0;
        while let Some(r) = tasks.join_next().await {
            if !r.unwrap().unwrap().duplicate {
                fresh += 1;
            }
        }
        assert_eq!(fresh, messages * 2, "one replica stored each copy");
    });

    for user in ["pere", "ana"] {
        let maildir: PathBuf = root.join("example.org").join(user);
        let ids = by_queue_id(&maildir);
        assert_eq!(ids.len(), messages, "{user}: every message");
        assert!(
            ids.values().all(|sizes| sizes.len() == 1),
            "{user}: no message twice"
        );
        // Maildir++ kept count through both replicas' appends.
        let text = std::fs::read_to_string(maildir.join("maildirsize")).unwrap();
        let (mut bytes, mut count) = (0i64, 0i64);
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            bytes += f.next().unwrap().parse::<i64>().unwrap();
            count += f.next().unwrap().parse::<i64>().unwrap();
        }
        let on_disk: u64 = ids.values().flatten().sum();
        assert_eq!(count as usize, messages, "{user}: maildirsize count");
        assert_eq!(bytes as u64, on_disk, "{user}: maildirsize bytes");
        assert_eq!(
            std::fs::read_dir(maildir.join("tmp")).unwrap().count(),
            0,
            "{user}: nothing left in tmp/"
        );
    }
}
