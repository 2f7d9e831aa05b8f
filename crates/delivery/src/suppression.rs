//! The suppression list: recipients whose delivery failed for good with a
//! class in `delivery.suppression.classes` (by default an invalid
//! recipient) are refused at once for `delivery.suppression.ttl`, with a
//! DSN that says so, without connecting to anyone. Shared by every
//! delivery process through Redis (`<prefix>:suppressed:<address>`, a
//! hash that expires on its own); `correu serve` without Redis keeps one
//! file per address in `<queue.spool>/suppressed`.
//!
//! A lookup that fails (Redis down) lets the message go: suppression saves
//! a remote server a useless attempt, it never holds mail back.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_runtime::Config;
use correu_runtime::redis::{Keyed, RedisError};
use deadpool_redis::Pool;
use deadpool_redis::redis::AsyncCommands;

/// One suppressed recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lower case.
    pub address: String,
    pub class: String,
    /// The enhanced status code of the failure that put it here.
    pub status: String,
    /// The failure, in words (the remote reply when there was one).
    pub reason: String,
    /// Unix seconds.
    pub added: u64,
    pub expires: u64,
}

impl Entry {
    fn fields(&self) -> [(&'static str, String); 5] {
        [
            ("class", self.class.clone()),
            ("status", self.status.clone()),
            ("reason", self.reason.clone()),
            ("added", self.added.to_string()),
            ("expires", self.expires.to_string()),
        ]
    }

    fn from_fields(address: &str, get: impl Fn(&str) -> Option<String>) -> Entry {
        let num = |k: &str| get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Entry {
            address: address.to_string(),
            class: get("class").unwrap_or_default(),
            status: get("status").unwrap_or_default(),
            reason: get("reason").unwrap_or_default(),
            added: num("added"),
            expires: num("expires"),
        }
    }
}

enum Store {
    Redis(Keyed),
    Dir(PathBuf),
}

/// The list, where the configuration keeps it.
pub struct Suppressions {
    store: Store,
    ttl: Duration,
    classes: Vec<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A file name for an address: lower case, every byte but letters, digits,
/// `.`, `-` and `@` as `%XX` (and a leading `.`, which would hide the file
/// among the temporary ones), so no address can name another path.
fn file_name(address: &str) -> String {
    let mut out = String::new();
    for (i, b) in address.to_lowercase().bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b"@-".contains(&b) || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Suppressions {
    /// The list when `delivery.suppression.enabled` (operators' commands
    /// pass `force` to reach it even when it is off).
    pub fn open(cfg: &Config, redis: Option<Pool>, force: bool) -> Option<Suppressions> {
        let s = &cfg.delivery.suppression;
        if !s.enabled && !force {
            return None;
        }
        let store = match redis {
            Some(pool) => Store::Redis(Keyed::new(&cfg.redis, pool)),
            None => Store::Dir(cfg.queue.spool.join("suppressed")),
        };
        Some(Suppressions {
            store,
            ttl: s.ttl.get(),
            classes: s.classes.clone(),
        })
    }

    /// Whether a failure of `class` puts its recipient on the list.
    pub fn suppresses(&self, class: &str) -> bool {
        self.classes.iter().any(|c| c == class)
    }

    /// An entry for `address`, now, expiring after the TTL.
    pub fn entry(&self, address: &str, class: &str, status: &str, reason: &str) -> Entry {
        let added = now();
        Entry {
            address: address.to_lowercase(),
            class: class.into(),
            status: status.into(),
            reason: reason.into(),
            added,
            expires: added + self.ttl.as_secs(),
        }
    }

    /// The entry of `address`, if it is on the list and not expired.
    pub async fn get(&self, address: &str) -> Result<Option<Entry>, RedisError> {
        let address = address.to_lowercase();
        match &self.store {
            Store::Redis(r) => {
                let (pool, prefix) = (&r.pool, &r.prefix);
                let key = format!("{prefix}:suppressed:{address}");
                let work = async {
                    let mut c = pool.get().await?;
                    let h: std::collections::HashMap<String, String> = c.hgetall(&key).await?;
                    Ok::<_, RedisError>(
                        (!h.is_empty())
                            .then(|| Entry::from_fields(&address, |k| h.get(k).cloned())),
                    )
                };
                tokio::time::timeout(r.timeout, work)
                    .await
                    .map_err(|_| RedisError::Timeout(r.timeout))?
            }
            Store::Dir(dir) => {
                let path = dir.join(file_name(&address));
                blocking(move || Ok(dir::read(&path, &address).filter(|e| e.expires > now()))).await
            }
        }
    }

    /// Puts `e` on the list (replacing what was there).
    pub async fn add(&self, e: &Entry) -> Result<(), RedisError> {
        match &self.store {
            Store::Redis(r) => {
                let (pool, prefix) = (&r.pool, &r.prefix);
                let key = format!("{prefix}:suppressed:{}", e.address);
                let ttl = e.expires.saturating_sub(now()).max(1) as i64;
                let fields = e.fields();
                let work = async {
                    let mut c = pool.get().await?;
                    deadpool_redis::redis::pipe()
                        .del(&key)
                        .ignore()
                        .hset_multiple(&key, &fields)
                        .ignore()
                        .expire(&key, ttl)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await?;
                    Ok::<_, RedisError>(())
                };
                tokio::time::timeout(r.timeout, work)
                    .await
                    .map_err(|_| RedisError::Timeout(r.timeout))?
            }
            Store::Dir(dir) => {
                let (dir, e) = (dir.clone(), e.clone());
                blocking(move || dir::write(&dir, &e)).await
            }
        }
    }

    /// Takes `address` off the list; whether it was on it.
    pub async fn remove(&self, address: &str) -> Result<bool, RedisError> {
        let address = address.to_lowercase();
        match &self.store {
            Store::Redis(Keyed { pool, prefix, .. }) => {
                let mut c = pool.get().await?;
                let n: u64 = c.del(format!("{prefix}:suppressed:{address}")).await?;
                Ok(n > 0)
            }
            Store::Dir(dir) => {
                let path = dir.join(file_name(&address));
                blocking(move || match std::fs::remove_file(path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                })
                .await
            }
        }
    }

    /// Every entry (up to `limit`), by address.
    pub async fn list(&self, limit: usize) -> Result<Vec<Entry>, RedisError> {
        let mut out = Vec::new();
        match &self.store {
            Store::Redis(Keyed { pool, prefix, .. }) => {
                let pattern = format!("{prefix}:suppressed:*");
                let mut c = pool.get().await?;
                let mut keys: Vec<String> = Vec::new();
                {
                    let mut iter = c.scan_match::<_, String>(&pattern).await?;
                    while let Some(k) = futures_util::StreamExt::next(&mut iter).await {
                        keys.push(k?);
                        if keys.len() >= limit {
                            break;
                        }
                    }
                }
                let skip = format!("{prefix}:suppressed:").len();
                for key in keys {
                    let h: std::collections::HashMap<String, String> = c.hgetall(&key).await?;
                    if !h.is_empty() {
                        out.push(Entry::from_fields(&key[skip..], |k| h.get(k).cloned()));
                    }
                }
            }
            Store::Dir(dir) => {
                let dir = dir.clone();
                out = blocking(move || dir::list(&dir, limit)).await?;
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }
}

/// Runs a directory-store operation off the Tokio workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, RedisError> {
    let io = |e: std::io::Error| RedisError::Command(e.into());
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
}

/// The directory store, one small file per address. Called only through
/// [`blocking`], so the blocking file calls are allowed here.
#[allow(clippy::disallowed_methods)]
mod dir {
    use super::{Entry, file_name, now, unescape};
    use std::path::Path;

    pub(super) fn read(path: &Path, address: &str) -> Option<Entry> {
        let text = std::fs::read_to_string(path).ok()?;
        let fields: std::collections::HashMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        Some(Entry::from_fields(address, |k| {
            fields.get(k).map(|v| v.to_string())
        }))
    }

    pub(super) fn write(dir: &Path, e: &Entry) -> std::io::Result<()> {
        let text: String = e
            .fields()
            .iter()
            .map(|(k, v)| format!("{k}={}\n", v.replace('\n', " ")))
            .collect();
        let path = dir.join(file_name(&e.address));
        let tmp = dir.join(format!(".{}.tmp", file_name(&e.address)));
        correu_runtime::sync::create_private_dirs(dir)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    pub(super) fn list(dir: &Path, limit: usize) -> std::io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let now = now();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Some(entry) = read(&e.path(), &unescape(&name))
                && entry.expires > now
            {
                out.push(entry);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

fn unescape(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = name
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_one_path_part_and_round_trip() {
        for a in [
            "Ana@Remote.test",
            "a/b@x.test",
            "../../etc@x",
            "\"q d\"@x.test",
        ] {
            let n = file_name(a);
            assert!(!n.contains('/') && !n.starts_with('.'), "{n}");
            assert_eq!(unescape(&n), a.to_lowercase());
        }
    }

    #[tokio::test]
    async fn a_directory_list_adds_expires_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.queue.spool = dir.path().to_path_buf();
        let s = Suppressions::open(&cfg, None, false).unwrap();
        let e = s.entry(
            "Ana@Remote.test",
            "invalid_recipient",
            "5.1.1",
            "550 5.1.1 no",
        );
        s.add(&e).await.unwrap();
        assert_eq!(s.get("ana@remote.TEST").await.unwrap(), Some(e.clone()));
        assert_eq!(s.list(10).await.unwrap(), vec![e.clone()]);
        let old = Entry {
            address: "old@x.test".into(),
            expires: now() - 1,
            ..e.clone()
        };
        s.add(&old).await.unwrap();
        assert_eq!(s.get("old@x.test").await.unwrap(), None, "expired");
        assert!(s.remove("ana@remote.test").await.unwrap());
        assert!(!s.remove("ana@remote.test").await.unwrap());
        assert_eq!(s.get("ana@remote.test").await.unwrap(), None);
    }
}
