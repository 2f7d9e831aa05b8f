//! Maildirs: waiting for messages and checking that each arrived exactly once.

use super::*;

/// The `Subject:` of each message file (empty when it has none).
pub fn subjects(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| {
            read(f)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

/// Asserts that the messages in `files` are subjects `{prefix}0` to
/// `{prefix}{total-1}`, each exactly once.
pub fn assert_subjects_once(files: &[PathBuf], prefix: &str, total: usize) {
    let mut subjects = subjects(files);
    subjects.sort();
    let mut want: Vec<String> = (0..total).map(|i| format!("{prefix}{i}")).collect();
    want.sort();
    assert_eq!(subjects, want, "every message exactly once");
}

/// Files in a Maildir's `new/`, waiting up to `within` for `count` of them.
pub fn wait_maildir(dir: &Path, count: usize, within: Duration) -> Vec<PathBuf> {
    let deadline = Instant::now() + within;
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(dir.join("new"))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if files.len() >= count || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Queue ids of the messages in a Maildir's `new/`, from the names
/// Correu gives them (`TIME.QUEUEID_HASH.HOST,S=SIZE`).
pub fn ids_in(maildir: &Path) -> Vec<String> {
    std::fs::read_dir(maildir.join("new"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.split('.')
                        .nth(1)
                        .and_then(|u| u.split('_').next())
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every accepted queue id is in the Maildir, then checks
/// that nothing is there twice.
pub fn assert_delivered_once(maildir: &Path, accepted: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    let want: std::collections::HashSet<&String> = accepted.iter().collect();
    loop {
        let ids = ids_in(maildir);
        let have: std::collections::HashSet<&String> = ids.iter().collect();
        let missing: Vec<_> = want.difference(&have).collect();
        if missing.is_empty() {
            // Settle: a late duplicate would show now.
            std::thread::sleep(Duration::from_secs(1));
            let ids = ids_in(maildir);
            let unique: std::collections::HashSet<&String> = ids.iter().collect();
            assert_eq!(ids.len(), unique.len(), "a message stored twice");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "accepted but not delivered: {} of {}, e.g. {:?}",
            missing.len(),
            want.len(),
            missing.first()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
