//! The operator's commands as a shell uses them: pipes that close early,
//! keys that must stay private and must not be overwritten by accident.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

/// `correu … | head`: the reader goes away, the command ends quietly (as
/// if SIGPIPE had killed it), not with a panic message.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let mut child = Command::new(CORREU)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before anything is printed.
    drop(child.stdout.take());
    child.stdin.take().unwrap().write_all(b"secret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.code(),
        Some(141),
        "{:?} {stderr}",
        out.status.signal()
    );
}

#[test]
fn dkim_keygen_makes_a_private_key_once_and_dns_ready_strings() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("example.org.pem");
    let k = key.to_str().unwrap();
    let (st, out, err) = run(
        CORREU,
        &["dkim", "keygen", "--domain", "example.org", "--out", k],
    );
    assert!(st.success(), "{out}{err}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(&key).unwrap();
    // The record: quoted strings of at most 255 octets each.
    let record = out.lines().find(|l| l.contains("IN TXT")).unwrap();
    let strings: Vec<&str> = record.split('"').skip(1).step_by(2).collect();
    assert!(
        strings.len() >= 2,
        "a 2048-bit key needs two strings: {record}"
    );
    assert!(strings.iter().all(|s| s.len() <= 255), "{record}");
    assert!(
        strings.concat().starts_with("v=DKIM1; k=rsa; p="),
        "{record}"
    );
    // Not replaced without --force.
    let (st, _, err) = run(
        CORREU,
        &["dkim", "keygen", "--domain", "example.org", "--out", k],
    );
    assert_eq!(st.code(), Some(64), "{err}");
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), first);
    let (st, _, err) = run(
        CORREU,
        &[
            "dkim",
            "keygen",
            "--domain",
            "example.org",
            "--out",
            k,
            "--force",
        ],
    );
    assert!(st.success(), "{err}");
    assert_ne!(std::fs::read(&key).unwrap(), first);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
