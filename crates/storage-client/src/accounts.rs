//! The accounts and aliases files: parsing, passwords, and watching them
//! for changes. Storage resolves addresses with them; ingress checks
//! `smtp.auth_file` passwords with the same code.
//!
//! The accounts file is Dovecot's passwd-file format, so one file can
//! serve Correu and a Dovecot beside it:
//!
//! ```text
//! # address:password:uid:gid:gecos:home:shell:extra fields
//! pere@example.org:{ARGON2ID}$argon2id$v=19$...::::::userdb_quota_rule=*:storage=1G
//! ana@example.org:{ARGON2ID}$argon2id$v=19$...
//! ```
//!
//! The password is an argon2 hash in PHC form (`correu account add` makes
//! one), or empty for an address that receives mail but cannot log in.
//! Of the extra fields, `userdb_quota_rule=*:storage=SIZE` (or
//! `quota=SIZE`) sets the mailbox's quota.
//!
//! The aliases file has one `address: target, target` per line; `@domain:
//! target` catches every address of a domain without a mailbox of its own.
//!
//! A malformed line is reported with its number and skipped; the others
//! stand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Argon2, PasswordHasher};
use correu_runtime::sync::{lock, read, write};

/// An account of the accounts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Lower-cased.
    pub address: String,
    /// argon2 in PHC form, without Dovecot's `{SCHEME}` prefix; `None`: no login.
    pub hash: Option<String>,
    /// Bytes; `None` for the default.
    pub quota: Option<u64>,
}

/// A size as Dovecot writes quotas (`1024`, `512k`, `100M`, `1G`, `2T`),
/// read as the configuration reads sizes.
pub fn parse_size(s: &str) -> Option<u64> {
    s.parse::<correu_runtime::config::Size>().ok().map(|z| z.0)
}

fn is_address(a: &str) -> bool {
    a.rsplit_once('@').is_some_and(|(l, d)| {
        !l.is_empty() && !d.is_empty() && !a.contains([' ', '\t', ':', ',', '/'])
    })
}

/// The accounts file's text: the accounts by lower-cased address, and one
/// error per bad line ("line N: …").
pub fn parse_accounts(text: &str) -> (HashMap<String, Account>, Vec<String>) {
    let mut accounts = HashMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Seven fields, then the extra fields (which may hold colons).
        let fields: Vec<&str> = line.splitn(8, ':').collect();
        let user = fields[0].to_lowercase();
        if !is_address(&user) {
            errors.push(format!("line {n}: {user:?} is not an address"));
            continue;
        }
        let password = fields.get(1).copied().unwrap_or("");
        let hash = match password {
            "" => None,
            p => {
                let bare = p
                    .strip_prefix("{ARGON2ID}")
                    .or_else(|| p.strip_prefix("{ARGON2I}"))
                    .unwrap_or(p);
                if PasswordHash::new(bare).is_err() {
                    errors.push(format!(
                        "line {n}: the password of {user} is not an argon2 hash"
                    ));
                    continue;
                }
                Some(bare.to_string())
            }
        };
        let mut quota = None;
        let mut bad = None;
        for field in fields.get(7).copied().unwrap_or("").split_whitespace() {
            let value = field
                .strip_prefix("userdb_quota_rule=*:storage=")
                .or_else(|| field.strip_prefix("quota_rule=*:storage="))
                .or_else(|| field.strip_prefix("quota="));
            if let Some(v) = value {
                match parse_size(v) {
                    Some(q) => quota = Some(q),
                    None => bad = Some(format!("line {n}: bad quota {v:?} for {user}")),
                }
            }
        }
        if let Some(e) = bad {
            errors.push(e);
            continue;
        }
        if accounts.contains_key(&user) {
            errors.push(format!(
                "line {n}: {user} is listed twice; the first stands"
            ));
            continue;
        }
        accounts.insert(
            user.clone(),
            Account {
                address: user,
                hash,
                quota,
            },
        );
    }
    (accounts, errors)
}

/// The aliases file: `address: target, target`; `@domain: target`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    /// Lower-cased address to its targets.
    pub aliases: HashMap<String, Vec<String>>,
    /// Lower-cased domain to the target of its catch-all.
    pub catch_all: HashMap<String, Vec<String>>,
}

pub fn parse_aliases(text: &str) -> (Aliases, Vec<String>) {
    let mut out = Aliases::default();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((from, to)) = line.split_once(':') else {
            errors.push(format!("line {n}: expected `address: target, …`"));
            continue;
        };
        let from = from.trim().to_lowercase();
        let targets: Vec<String> = to
            .split(',')
            .map(|t| t.trim().to_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        if targets.is_empty() {
            errors.push(format!("line {n}: {from} has no target"));
            continue;
        }
        if let Some(t) = targets.iter().find(|t| !is_address(t)) {
            errors.push(format!("line {n}: target {t:?} is not an address"));
            continue;
        }
        let table = match from.strip_prefix('@') {
            Some(domain) if !domain.is_empty() && !domain.contains('@') => {
                out.catch_all.entry(domain.to_string())
            }
            _ if is_address(&from) => out.aliases.entry(from.clone()),
            _ => {
                errors.push(format!("line {n}: {from:?} is not an address or @domain"));
                continue;
            }
        };
        match table {
            std::collections::hash_map::Entry::Occupied(_) => {
                errors.push(format!(
                    "line {n}: {from} is listed twice; the first stands"
                ));
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(targets);
            }
        }
    }
    (out, errors)
}

/// The Argon2 Correu hashes new passwords with: argon2id, 19 MiB of
/// memory, 2 passes, 1 lane. That is OWASP's first recommendation and the
/// argon2 crate's default: about 40 ms per check on this kind of machine,
/// slow enough against a stolen file, and a 19 MiB working set that
/// [`check_password`] bounds in number.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
pub const ARGON2_PASSES: u32 = 2;
pub const ARGON2_LANES: u32 = 1;

/// A hash that asks for more memory than this is not checked at all (an
/// accounts file with one would let each login take that much).
const MAX_VERIFY_MEMORY_KIB: u32 = 64 * 1024;

fn argon2() -> Argon2<'static> {
    let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, None)
        // Constant, valid parameters (the crate's own defaults).
        .unwrap_or_default();
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// An argon2id hash of `password` in PHC form, for the accounts file.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let bytes: [u8; 16] = rand::random();
    let salt = argon2::password_hash::SaltString::encode_b64(&bytes)?;
    Ok(argon2()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Whether `password` matches the PHC `hash`, with the parameters the hash
/// names (slow on purpose: blocking; services call [`check_password`]).
pub fn verify_password(hash: &str, password: &str) -> bool {
    VERIFICATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PasswordHash::new(hash).is_ok_and(|parsed| {
        let m = parsed.params.get_decimal("m").unwrap_or(ARGON2_MEMORY_KIB);
        if m > MAX_VERIFY_MEMORY_KIB {
            tracing::warn!(
                memory_kib = m,
                "a password hash asks for too much memory; refused"
            );
            return false;
        }
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Argon2 checks made by this process (a dummy check counts too).
static VERIFICATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many Argon2 checks this process has made.
pub fn verifications() -> u64 {
    VERIFICATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Password checks running at once in this process, at most: each holds
/// a 19 MiB working set, so a flood of logins waits here instead of
/// growing memory (forty at once took a server to 3.9 GB).
pub fn max_checks_in_flight() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
}

static CHECKS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(max_checks_in_flight()));

/// Checked against when there is no hash to check (no such account, or
/// one that cannot log in), so that answer takes as long as a wrong
/// password for a real account: the time does not say which accounts exist.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password("correu dummy password, never anyone's").unwrap_or_default()
});

static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MOST_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The most checks seen running at once (for tests and metrics).
pub fn most_checks_in_flight() -> usize {
    MOST_IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `password` matches `hash` (`None`: no account, or no password,
/// checked against a dummy hash all the same), with at most
/// [`max_checks_in_flight`] checks at once, on the blocking pool.
pub async fn check_password(hash: Option<String>, password: String) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    // The semaphore is never closed.
    let Ok(_permit) = CHECKS.acquire().await else {
        return false;
    };
    let now = IN_FLIGHT.fetch_add(1, Relaxed) + 1;
    MOST_IN_FLIGHT.fetch_max(now, Relaxed);
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => verify_password(&h, &password),
        None => {
            let _same_time = verify_password(&DUMMY_HASH, &password);
            false
        }
    })
    .await
    .unwrap_or(false);
    IN_FLIGHT.fetch_sub(1, Relaxed);
    ok
}

/// How often a watched file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// A file parsed into `T`, reread when its modification time changes. A
/// thread of its own looks once a second, so a caller of [`Watched::get`]
/// (an async task answering RCPT) never waits on the disk. A file that
/// cannot be read keeps the last good contents in force; a file that does
/// not exist yet counts as empty until it appears.
pub struct Watched<T> {
    inner: Arc<WatchedFile<T>>,
}

struct WatchedFile<T> {
    path: PathBuf,
    what: &'static str,
    parse: fn(&str) -> (T, Vec<String>),
    /// The modification time read (`None`: the file was never there) and
    /// what it held.
    state: RwLock<(Option<SystemTime>, Arc<T>)>,
    /// The last problem logged, so a file that stays missing or unreadable
    /// is reported once, not every second.
    problem: Mutex<Option<String>>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Reads the file now. One that does not exist yet is an empty set,
    /// with a warning naming it, and is read when it appears; one that
    /// exists but cannot be read stops the start. The watcher thread ends
    /// with the last `Watched`.
    pub fn open(
        path: &Path,
        what: &'static str,
        parse: fn(&str) -> (T, Vec<String>),
    ) -> std::io::Result<Watched<T>> {
        let (mtime, value, problem) = match std::fs::metadata(path) {
            Ok(m) => (
                m.modified().ok(),
                WatchedFile::load(path, what, parse)?,
                None,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    file = %path.display(),
                    "{what}: {} does not exist yet; starting with none, and reading it when it appears",
                    path.display()
                );
                // What an empty file holds.
                (None, parse("").0, Some(missing(&e)))
            }
            Err(e) => return Err(e),
        };
        let inner = Arc::new(WatchedFile {
            path: path.into(),
            what,
            parse,
            state: RwLock::new((mtime, Arc::new(value))),
            problem: Mutex::new(problem),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name(format!("watch-{what}"))
            .spawn(move || {
                loop {
                    std::thread::sleep(RECHECK);
                    let Some(file) = weak.upgrade() else {
                        return;
                    };
                    file.reload_if_changed();
                }
            })?;
        Ok(Watched { inner })
    }
}

impl<T> Watched<T> {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The contents in force (never touches the disk).
    pub fn get(&self) -> Arc<T> {
        read(&self.inner.state).1.clone()
    }

    /// Rereads the file now if its modification time moved, or it
    /// appeared (the watcher does this every second). Blocking.
    pub fn reload_if_changed(&self) {
        self.inner.reload_if_changed()
    }
}

/// How a missing file's problem is remembered (one message per kind).
fn missing(e: &std::io::Error) -> String {
    format!("missing: {e}")
}

impl<T> WatchedFile<T> {
    fn load(
        path: &Path,
        what: &'static str,
        parse: fn(&str) -> (T, Vec<String>),
    ) -> std::io::Result<T> {
        let text = std::fs::read_to_string(path)?;
        let (value, errors) = parse(&text);
        for e in &errors {
            tracing::warn!(file = %path.display(), "{what}: {e}");
        }
        tracing::info!(file = %path.display(), errors = errors.len(), "{what} loaded");
        Ok(value)
    }

    /// Logs a problem with the file once, until it changes or is solved.
    fn complain(&self, key: String, e: &std::io::Error) {
        let mut last = lock(&self.problem);
        if last.as_deref() != Some(key.as_str()) {
            tracing::error!(file = %self.path.display(), error = %e, "{}: cannot read; keeping the last contents", self.what);
            *last = Some(key);
        }
    }

    fn reload_if_changed(&self) {
        let mtime = match std::fs::metadata(&self.path) {
            Ok(m) => m.modified().ok(),
            Err(e) => {
                let key = match e.kind() {
                    std::io::ErrorKind::NotFound => missing(&e),
                    _ => e.to_string(),
                };
                self.complain(key, &e);
                return;
            }
        };
        if read(&self.state).0 == mtime {
            // As last read (it may have been away and come back).
            *lock(&self.problem) = None;
            return;
        }
        match Self::load(&self.path, self.what, self.parse) {
            Ok(value) => {
                *write(&self.state) = (mtime, Arc::new(value));
                *lock(&self.problem) = None;
            }
            Err(e) => self.complain(e.to_string(), &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A login flood waits for a few checks at a time; an unknown account
    /// costs an Argon2 check like a known one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_checks_are_bounded_and_unknown_accounts_cost_the_same() {
        let hash = hash_password("right").unwrap();
        let checks: Vec<_> = (0..24)
            .map(|i| {
                let h = (i % 2 == 0).then(|| hash.clone());
                tokio::spawn(check_password(h, "wrong".into()))
            })
            .collect();
        for c in checks {
            assert!(!c.await.unwrap());
        }
        assert!(most_checks_in_flight() <= max_checks_in_flight());
        assert!(most_checks_in_flight() >= 1);
        let before = verifications();
        assert!(!check_password(None, "anything".into()).await);
        assert_eq!(verifications(), before + 1, "a dummy check was made");
        assert!(check_password(Some(hash), "right".into()).await);
    }

    #[test]
    fn hashes_use_the_chosen_parameters_and_greedy_ones_are_refused() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        // A hash that would take 1 GiB per check is not checked.
        let greedy = h.replace("m=19456", "m=1048576");
        assert!(!verify_password(&greedy, "pw"));
    }

    #[test]
    fn sizes() {
        for (s, want) in [
            ("0", Some(0)),
            ("1024", Some(1024)),
            ("512k", Some(512 << 10)),
            ("100M", Some(100 << 20)),
            ("1G", Some(1 << 30)),
            ("2T", Some(2 << 40)),
            ("1X", None),
            ("", None),
            ("-1", None),
        ] {
            assert_eq!(parse_size(s), want, "{s}");
        }
    }

    #[test]
    fn accounts_file_lines() {
        let hash = hash_password("secret").unwrap();
        let text = format!(
            "# accounts\n\
             Pere@Example.org:{{ARGON2ID}}{hash}::::::userdb_quota_rule=*:storage=1M\n\
             ana@example.org:{hash}\n\
             robot@example.org:\n\
             broken line\n\
             x@example.org:plaintext\n\
             y@example.org:{hash}::::::quota=lots\n\
             ana@example.org:{hash}\n"
        );
        let (accounts, errors) = parse_accounts(&text);
        assert_eq!(accounts.len(), 3, "{accounts:?}");
        assert_eq!(accounts["pere@example.org"].quota, Some(1 << 20));
        assert_eq!(
            accounts["pere@example.org"].hash.as_deref(),
            Some(hash.as_str())
        );
        assert_eq!(accounts["ana@example.org"].quota, None);
        assert_eq!(accounts["robot@example.org"].hash, None);
        assert_eq!(
            errors,
            vec![
                "line 5: \"broken line\" is not an address",
                "line 6: the password of x@example.org is not an argon2 hash",
                "line 7: bad quota \"lots\" for y@example.org",
                "line 8: ana@example.org is listed twice; the first stands",
            ]
        );
        assert!(verify_password(&hash, "secret"));
        assert!(!verify_password(&hash, "Secret"));
    }

    #[test]
    fn aliases_file_lines() {
        let (a, errors) = parse_aliases(
            "postmaster@example.org: pere@example.org\n\
             team@example.org: pere@example.org, ana@example.org\n\
             @example.org: pere@example.org\n\
             nothing@example.org:\n\
             bad@example.org: not an address\n\
             no colon\n",
        );
        assert_eq!(a.aliases["team@example.org"].len(), 2);
        assert_eq!(a.catch_all["example.org"], vec!["pere@example.org"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("line 4:"));
        assert!(errors[1].starts_with("line 5:"));
        assert!(errors[2].starts_with("line 6:"));
    }

    #[test]
    fn a_changed_file_is_reread_and_a_vanished_one_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let w = watched(
            dir.path(),
            "accounts",
            "pere@example.org:\n",
            "accounts",
            parse_accounts,
        );
        assert!(w.get().contains_key("pere@example.org"));
        std::fs::write(w.path(), "ana@example.org:\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(w.path())
            .unwrap()
            .set_modified(later)
            .unwrap();
        w.reload_if_changed();
        assert!(w.get().contains_key("ana@example.org"));
        assert!(!w.get().contains_key("pere@example.org"));
        std::fs::remove_file(w.path()).unwrap();
        w.reload_if_changed();
        assert!(w.get().contains_key("ana@example.org"));
    }

    /// A file that does not exist yet is an empty set, then read when it
    /// appears.
    #[test]
    fn a_missing_file_is_empty_until_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let w = Watched::open(&path, "accounts", parse_accounts).unwrap();
        assert!(w.get().is_empty());
        w.reload_if_changed();
        assert!(w.get().is_empty());
        std::fs::write(&path, "pere@example.org:\n").unwrap();
        w.reload_if_changed();
        assert!(w.get().contains_key("pere@example.org"));
        // Aliases too.
        let path = dir.path().join("aliases");
        let a = Watched::open(&path, "aliases", parse_aliases).unwrap();
        assert!(a.get().aliases.is_empty());
        std::fs::write(&path, "team@example.org: pere@example.org\n").unwrap();
        a.reload_if_changed();
        assert!(a.get().aliases.contains_key("team@example.org"));
    }

    fn watched<T: Send + Sync + 'static>(
        dir: &Path,
        name: &str,
        text: &str,
        what: &'static str,
        parse: fn(&str) -> (T, Vec<String>),
    ) -> Watched<T> {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Watched::open(&path, what, parse).unwrap()
    }
}
