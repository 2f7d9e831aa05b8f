//! The operator's side, against the real parts: `correu account` edits
//! keep the accounts file readable by a real Dovecot, storage starts before
//! its accounts file exists and picks it up, and the admin commands print
//! what was asked for, without log lines unless `-v`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

/// Whether Dovecot on `port` lets `user` in with `password` over IMAP
/// (Python's imaplib), and what it said.
fn imap_login(port: u16, user: &str, password: &str) -> (bool, String) {
    let script = format!(
        "import imaplib\n\
         m = imaplib.IMAP4('127.0.0.1', {port})\n\
         try:\n\
         \x20   m.login({user:?}, {password:?})\n\
         except imaplib.IMAP4.error as e:\n\
         \x20   print('refused', e)\n\
         \x20   raise SystemExit(1)\n\
         typ, data = m.select('INBOX')\n\
         assert typ == 'OK', (typ, data)\n\
         m.logout()\n\
         print('logged in')\n"
    );
    let (st, out, err) = run(&python(), &["-c", &script]);
    (st.success(), format!("{out}{err}"))
}

/// (uid, gid, mode) of a file.
fn owner_group_mode(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// The README's set-up: the accounts file is group `dovecot`, mode 0640,
/// and Dovecot's unprivileged auth process reads it. Every `correu
/// account` command that rewrites it keeps that, and Dovecot still logs
/// the users in after each one.
#[test]
fn account_edits_keep_the_files_group_and_dovecot_still_logs_in() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mail");
    let accounts = dir.path().join("accounts");
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "domains = [\"example.org\"]\n[storage]\nroot = \"{}\"\naccounts_file = \"{}\"\naliases_file = \"{}\"\n",
            root.display(),
            accounts.display(),
            dir.path().join("aliases").display(),
        ),
    )
    .unwrap();
    for user in ["pere", "ana"] {
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(root.join("example.org").join(user).join(sub)).unwrap();
        }
    }
    let (st, _, err) = run("chown", &["-R", "65534:65534", root.to_str().unwrap()]);
    assert!(st.success(), "{err}");

    correu_cli(
        CORREU,
        &cfg,
        &["account", "add", "pere@example.org"],
        "first\n",
    );
    assert_eq!(
        owner_group_mode(&accounts).2,
        0o600,
        "a new file is private"
    );
    // As the README says: Dovecot's auth reads it as group dovecot.
    for (cmd, arg) in [("chgrp", "dovecot"), ("chmod", "0640")] {
        let (st, _, err) = run(cmd, &[arg, accounts.to_str().unwrap()]);
        assert!(st.success(), "{cmd}: {err}");
    }
    let set_up = owner_group_mode(&accounts);
    let (st, gid, _) = run("getent", &["group", "dovecot"]);
    assert!(
        st.success(),
        "Debian's dovecot-core makes the group dovecot"
    );
    let dovecot_gid: u32 = gid.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(set_up, (0, dovecot_gid, 0o640));

    let (dovecot, port) = dovecot(dir.path(), &accounts, &root);
    let logs_in = |user: &str, password: &str| {
        // Dovecot looks at the file at most once a second: a refusal as a
        // wrong password is asked again for a moment; a temporary failure
        // (the file unreadable) is not.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (ok, said) = imap_login(port, user, password);
            if ok {
                return;
            }
            assert!(
                said.contains("AUTHENTICATIONFAILED") && Instant::now() < deadline,
                "{user} with {password:?}: {said}\n{}\n{}",
                dovecot.output(),
                std::fs::read_to_string(&accounts).unwrap_or_default()
            );
        }
    };
    // A command that rewrites the file keeps its owner, group and mode,
    // and moves its mtime to a later second (Dovecot compares whole
    // seconds and the size: a same-size `passwd` must still be seen).
    let edit = |args: &[&str], stdin: &str| {
        let before = std::fs::metadata(&accounts).unwrap();
        correu_cli(CORREU, &cfg, args, stdin);
        let after = std::fs::metadata(&accounts).unwrap();
        assert_ne!(before.ino(), after.ino(), "{args:?} replaced the file");
        assert_eq!(owner_group_mode(&accounts), set_up, "after {args:?}");
        assert!(after.mtime() > before.mtime(), "after {args:?}: mtime");
    };
    logs_in("pere@example.org", "first");

    // add: another account.
    edit(&["account", "add", "ana@example.org"], "anas\n");
    logs_in("ana@example.org", "anas");
    logs_in("pere@example.org", "first");

    // passwd, at once (the same second as the add, often): the new
    // password works, the old one does not.
    edit(&["account", "passwd", "ana@example.org"], "anas2\n");
    edit(&["account", "passwd", "pere@example.org"], "second\n");
    logs_in("pere@example.org", "second");
    logs_in("ana@example.org", "anas2");
    let (ok, said) = imap_login(port, "pere@example.org", "first");
    assert!(
        !ok && said.contains("AUTHENTICATIONFAILED"),
        "the old password is refused as wrong, not as a failure: {said}"
    );

    // del: ana is gone, pere still logs in.
    edit(&["account", "del", "ana@example.org"], "");
    logs_in("pere@example.org", "second");
    let (ok, said) = imap_login(port, "ana@example.org", "anas2");
    assert!(!ok && said.contains("AUTHENTICATIONFAILED"), "{said}");

    // The aliases file is kept the same way.
    correu_cli(
        CORREU,
        &cfg,
        &["alias", "add", "postmaster@example.org", "pere@example.org"],
        "",
    );
    let aliases = dir.path().join("aliases");
    for (cmd, arg) in [("chgrp", "dovecot"), ("chmod", "0640")] {
        let (st, _, err) = run(cmd, &[arg, aliases.to_str().unwrap()]);
        assert!(st.success(), "{cmd}: {err}");
    }
    correu_cli(
        CORREU,
        &cfg,
        &["alias", "add", "abuse@example.org", "pere@example.org"],
        "",
    );
    assert_eq!(owner_group_mode(&aliases), (0, dovecot_gid, 0o640));
    drop(dovecot);
}

/// Storage configured with accounts and aliases files that do not exist
/// yet starts (with a warning naming each), refuses every recipient, and
/// takes the files in when they appear.
#[test]
fn storage_starts_before_its_accounts_file_exists_and_picks_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("etc/accounts");
    let aliases = dir.path().join("etc/aliases");
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "domains = [\"example.org\"]\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\naccounts_file = \"{}\"\naliases_file = \"{}\"\n[queue]\nspool = \"queue\"\n",
            accounts.display(),
            aliases.display(),
        ),
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let mx = serve.serve_smtp_addr();
    for file in [&accounts, &aliases] {
        let warning = serve.wait_for(
            &format!("{} does not exist yet", file.display()),
            Duration::from_secs(10),
        );
        assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    }

    let rcpt = |to: &str| {
        let mut c = Smtp::connect(mx);
        c.read();
        c.cmd("EHLO client.example");
        c.cmd("MAIL FROM:<jo@domini.com>");
        let r = c.cmd(&format!("RCPT TO:<{to}>"));
        c.cmd("QUIT");
        r
    };
    let refused = rcpt("pere@example.org");
    assert_eq!(refused.code, 550, "no accounts yet: unknown, {refused:?}");
    assert!(refused.to_string().contains("5.1.1"), "{refused:?}");

    // The operator makes the accounts file (its directory too).
    std::fs::create_dir_all(accounts.parent().unwrap()).unwrap();
    correu_cli(
        CORREU,
        &cfg,
        &["account", "add", "pere@example.org"],
        "secret\n",
    );
    let wait_accepted = |to: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = rcpt(to);
            if r.code == 250 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{to} still refused 5 s after the file appeared: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_accepted("pere@example.org");
    assert_eq!(rcpt("ana@example.org").code, 550);

    // The aliases file appears as well.
    std::fs::write(&aliases, "team@example.org: pere@example.org\n").unwrap();
    wait_accepted("team@example.org");
    serve.wait_for("\"message\":\"aliases loaded\"", Duration::from_secs(5));
}

/// `correu queue status -c FILE [-v…]` with `CORREU_LOG=info` in the
/// environment, as in a service's pod: (success, stdout, stderr).
fn queue_status(cfg: &Path, verbose: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(CORREU);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CORREU_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["queue", "--config", cfg.to_str().unwrap(), "status"])
        .args(verbose)
        .env("CORREU_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An admin command prints its answer and no log line; `-v` adds the
/// info lines (here "connected to RabbitMQ"), on standard error.
#[test]
fn admin_commands_print_no_log_lines_unless_verbose() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("cli-logs");
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        format!(
            "[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\n",
            vhost.url(RABBITMQ.parse().unwrap())
        ),
    )
    .unwrap();

    let (ok, out, err) = queue_status(&cfg, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("correu.delivery"), "the counts: {out}");
    assert_eq!(err, "", "no log line on standard error");
    assert!(
        !out.contains("connected to RabbitMQ") && !out.contains("\"level\""),
        "no log line on standard output: {out}"
    );

    for flag in ["-v", "--verbose"] {
        let (ok, out, err) = queue_status(&cfg, &[flag]);
        assert!(ok, "{out}{err}");
        assert!(out.contains("correu.delivery"), "{out}");
        assert!(
            err.contains("INFO") && err.contains("connected to RabbitMQ"),
            "{flag}: the info lines, as text: {err}"
        );
        assert!(
            !out.contains("connected to RabbitMQ"),
            "logs stay off stdout"
        );
    }

    // Before the subcommand too; -vv adds debug.
    let mut cmd = Command::new(CORREU);
    let out = cmd
        .args(["-vv", "queue", "--config", cfg.to_str().unwrap(), "status"])
        .env_remove("CORREU_LOG")
        .env_remove("CORREU_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("connected to RabbitMQ"), "{err}");

    // An error is said once, plainly, without a log line.
    let (st, out, err) = run_with_stdin(
        CORREU,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "account",
            "passwd",
            "nobody@example.org",
        ],
        "x\n",
    );
    assert!(!st.success(), "{out}");
    assert_eq!(
        err.trim(),
        "correu: storage.accounts_file is not set in the configuration",
        "{err}"
    );
}
