//! Mailboxes as Maildir, laid out the way Dovecot reads them.
//!
//! `ROOT/DOMAIN/LOCALPART/` is a Maildir with `tmp/`, `new/` and `cur/`. A
//! message is written to `tmp/`, fsynced, hard-linked into `new/` and the
//! directory fsynced: a reader never sees half a message, and two storage
//! replicas on one shared volume never clobber each other (the link fails if
//! the name exists). File names are Dovecot's `TIME.UNIQUE.HOST,S=SIZE`,
//! where UNIQUE is `QUEUEID_RCPTHASH`: the same (queue id, recipient) always
//! gets the same name, which is what makes delivery idempotent. A marker in
//! `ROOT/.correu/delivered/` remembers each delivery after Dovecot has moved
//! the file to `cur/` and renamed it with flags.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a mailbox operation failed; mapped to gRPC codes in one place
/// ([`crate::service`]).
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("no such mailbox: {0}")]
    UnknownRecipient(String),
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("no such message: {0}")]
    NoMessage(String),
    #[error("mailbox I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The outcome of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub mailbox: String,
    pub message_id: String,
    pub duplicate: bool,
}

/// A message as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub size: u64,
    pub received_at_unix_micros: i64,
    pub flags: String,
}

/// The mailboxes under one root, and who has one.
#[derive(Debug, Clone)]
pub struct Mailboxes {
    root: PathBuf,
    host: String,
    domains: Vec<String>,
    /// Lower-cased addresses with a mailbox; `None` accepts every local-part.
    accounts: Option<Vec<String>>,
}

/// FNV-1a, 64 bits: a stable hash of the recipient for file names (not a
/// security boundary: the queue id already makes names unguessable enough).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A local part as a directory name: lower-cased; anything outside a safe
/// set (and a leading dot, which Maildir++ reserves for folders) as `%XX`.
fn encode_local(local: &str) -> String {
    let mut out = String::new();
    for (i, b) in local.to_lowercase().bytes().enumerate() {
        let safe =
            b.is_ascii_alphanumeric() || b"-_+=!#$&'*^`{|}~".contains(&b) || (b == b'.' && i > 0);
        if safe {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A message id names a file in `new/` or `cur/`: no separators or flags.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 255
        && !id.contains(['/', '\\', ':', '\0'])
}

impl Mailboxes {
    /// `accounts` empty means catch-all.
    pub fn new(root: &Path, host: &str, domains: &[String], accounts: &[String]) -> Self {
        Mailboxes {
            root: root.to_path_buf(),
            // The host part of a Maildir name may not hold '/' or ':'.
            host: host.replace(['/', ':'], "_"),
            domains: domains.iter().map(|d| d.to_lowercase()).collect(),
            accounts: (!accounts.is_empty())
                .then(|| accounts.iter().map(|a| a.to_lowercase()).collect()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The mailbox directory of `address`, when it has one here.
    pub fn resolve(&self, address: &str) -> Result<PathBuf, MailboxError> {
        let (local, domain) = address
            .rsplit_once('@')
            .filter(|(l, d)| !l.is_empty() && !d.is_empty())
            .ok_or_else(|| MailboxError::Invalid(format!("not an address: {address:?}")))?;
        let domain = domain.to_lowercase();
        let unknown = || MailboxError::UnknownRecipient(address.to_string());
        if !self.domains.contains(&domain)
            || domain.contains(['/', '\\'])
            || domain.starts_with('.')
        {
            return Err(unknown());
        }
        if let Some(accounts) = &self.accounts
            && !accounts.contains(&format!("{}@{domain}", local.to_lowercase()))
        {
            return Err(unknown());
        }
        Ok(self.root.join(domain).join(encode_local(local)))
    }

    /// Stores `content` for `recipient`, once per (queue id, recipient).
    /// Blocking: call it from `spawn_blocking`.
    pub fn deliver(
        &self,
        queue_id: &str,
        sender: &str,
        recipient: &str,
        content: &[u8],
        received_at_unix_micros: i64,
    ) -> Result<Delivered, MailboxError> {
        if !valid_id(queue_id) || queue_id.contains('.') {
            return Err(MailboxError::Invalid(format!("bad queue id {queue_id:?}")));
        }
        let dir = self.resolve(recipient)?;
        let key = format!("{queue_id}_{:016x}", fnv1a(&recipient.to_lowercase()));
        let marker_dir = self
            .root
            .join(".correu")
            .join("delivered")
            .join(&queue_id[..queue_id.len().min(8)]);
        let marker = marker_dir.join(&key);
        if let Ok(id) = std::fs::read_to_string(&marker) {
            return Ok(Delivered {
                mailbox: recipient.to_lowercase(),
                message_id: id,
                duplicate: true,
            });
        }
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Return-Path and Delivered-To (RFC 5321 §4.4, RFC 9228) come first.
        let mut head =
            format!("Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n").into_bytes();
        head.reserve(content.len());
        let size = head.len() + content.len();
        let secs = received_at_unix_micros.div_euclid(1_000_000);
        let name = format!("{secs}.{key}.{},S={size}", self.host);
        let tmp = dir
            .join("tmp")
            .join(format!("{name}.{}", std::process::id()));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&head)?;
            f.write_all(content)?;
            f.sync_all()?;
        }
        let new = dir.join("new").join(&name);
        let duplicate = match std::fs::hard_link(&tmp, &new) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => true,
            Err(e) => {
                let _cleanup = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        std::fs::remove_file(&tmp)?;
        sync_dir(&dir.join("new"))?;
        std::fs::create_dir_all(&marker_dir)?;
        std::fs::write(&marker, &name)?;
        Ok(Delivered {
            mailbox: recipient.to_lowercase(),
            message_id: name,
            duplicate,
        })
    }

    /// The messages of a mailbox, newest first, from `offset`, at most `limit`.
    /// Returns them and whether more follow.
    pub fn list(
        &self,
        address: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<Listed>, bool), MailboxError> {
        let dir = self.resolve(address)?;
        let mut all = Vec::new();
        for sub in ["new", "cur"] {
            let entries = match std::fs::read_dir(dir.join(sub)) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for e in entries {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let (id, flags) = match name.split_once(":2,") {
                    Some((id, f)) => (id.to_string(), f.to_string()),
                    None => (name.clone(), String::new()),
                };
                let size = match id.split_once(",S=") {
                    Some((_, s)) => s.split(',').next().and_then(|s| s.parse().ok()),
                    None => None,
                };
                let size = match size {
                    Some(s) => s,
                    None => e.metadata()?.len(),
                };
                let secs: i64 = id
                    .split('.')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                all.push(Listed {
                    id,
                    size,
                    received_at_unix_micros: secs * 1_000_000,
                    flags,
                });
            }
        }
        all.sort_by(|a, b| {
            b.received_at_unix_micros
                .cmp(&a.received_at_unix_micros)
                .then_with(|| b.id.cmp(&a.id))
        });
        let more = all.len() > offset + limit;
        Ok((all.into_iter().skip(offset).take(limit).collect(), more))
    }

    /// The path of message `id` in the mailbox of `address`.
    pub fn find(&self, address: &str, id: &str) -> Result<PathBuf, MailboxError> {
        if !valid_id(id) {
            return Err(MailboxError::Invalid(format!("bad message id {id:?}")));
        }
        let dir = self.resolve(address)?;
        let new = dir.join("new").join(id);
        if new.exists() {
            return Ok(new);
        }
        let prefix = format!("{id}:2,");
        if let Ok(entries) = std::fs::read_dir(dir.join("cur")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix)
                    || e.file_name().to_string_lossy() == id
                {
                    return Ok(e.path());
                }
            }
        }
        Err(MailboxError::NoMessage(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(root: &Path, accounts: &[&str]) -> Mailboxes {
        let accounts: Vec<String> = accounts.iter().map(|s| s.to_string()).collect();
        Mailboxes::new(root, "mx.test", &["localhost".into()], &accounts)
    }

    #[test]
    fn delivers_once_per_queue_id_and_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let m = boxes(dir.path(), &[]);
        let first = m
            .deliver(
                "0ABC",
                "jo@domini.com",
                "pere@localhost",
                b"Subject: x\r\n\r\nhi\r\n",
                1_700_000_000_000_000,
            )
            .unwrap();
        assert!(!first.duplicate);
        let again = m
            .deliver(
                "0ABC",
                "jo@domini.com",
                "Pere@localhost",
                b"Subject: x\r\n\r\nhi\r\n",
                1_700_000_000_000_000,
            )
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message_id, first.message_id);
        let other = m
            .deliver(
                "0ABD",
                "jo@domini.com",
                "pere@localhost",
                b"x\r\n",
                1_700_000_001_000_000,
            )
            .unwrap();
        assert!(!other.duplicate);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("localhost/pere/new"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 2);
        let text = std::fs::read_to_string(
            dir.path()
                .join("localhost/pere/new")
                .join(&first.message_id),
        )
        .unwrap();
        assert!(
            text.starts_with(
                "Return-Path: <jo@domini.com>\r\nDelivered-To: pere@localhost\r\nSubject: x"
            ),
            "{text}"
        );
        assert!(first.message_id.starts_with("1700000000.0ABC_"));
        assert!(first.message_id.ends_with(&format!(",S={}", text.len())));
        assert!(
            std::fs::read_dir(dir.path().join("localhost/pere/tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn redelivery_after_dovecot_moved_the_file_is_still_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let m = boxes(dir.path(), &[]);
        let d = m
            .deliver("0ABC", "", "pere@localhost", b"x\r\n", 0)
            .unwrap();
        let mbox = dir.path().join("localhost/pere");
        std::fs::rename(
            mbox.join("new").join(&d.message_id),
            mbox.join("cur").join(format!("{}:2,S", d.message_id)),
        )
        .unwrap();
        assert!(
            m.deliver("0ABC", "", "pere@localhost", b"x\r\n", 0)
                .unwrap()
                .duplicate
        );
        let (list, more) = m.list("pere@localhost", 0, 10).unwrap();
        assert!(!more);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].flags, "S");
        assert_eq!(
            m.find("pere@localhost", &d.message_id).unwrap(),
            mbox.join("cur").join(format!("{}:2,S", d.message_id))
        );
    }

    #[test]
    fn accounts_unknown_users_and_unsafe_names() {
        let dir = tempfile::tempdir().unwrap();
        let m = boxes(dir.path(), &["pere@localhost"]);
        assert!(m.resolve("PERE@LocalHost").is_ok());
        assert!(matches!(
            m.resolve("anna@localhost"),
            Err(MailboxError::UnknownRecipient(_))
        ));
        assert!(matches!(
            m.resolve("pere@elsewhere.org"),
            Err(MailboxError::UnknownRecipient(_))
        ));
        assert!(matches!(
            m.resolve("nodomain"),
            Err(MailboxError::Invalid(_))
        ));
        let open = boxes(dir.path(), &[]);
        assert_eq!(
            open.resolve("../x@localhost").unwrap(),
            dir.path().join("localhost/%2E.%2Fx")
        );
        assert_eq!(
            open.resolve(".hidden@localhost").unwrap(),
            dir.path().join("localhost/%2Ehidden")
        );
        assert!(matches!(
            open.find("pere@localhost", "../../etc/passwd"),
            Err(MailboxError::Invalid(_))
        ));
        assert!(matches!(
            open.deliver("../x", "", "pere@localhost", b"", 0),
            Err(MailboxError::Invalid(_))
        ));
    }

    #[test]
    fn lists_newest_first_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let m = boxes(dir.path(), &[]);
        for i in 0..5 {
            m.deliver(
                &format!("Q{i}"),
                "",
                "pere@localhost",
                b"x\r\n",
                i * 1_000_000,
            )
            .unwrap();
        }
        let (page, more) = m.list("pere@localhost", 0, 2).unwrap();
        assert!(more);
        assert_eq!(
            page.iter()
                .map(|l| l.received_at_unix_micros / 1_000_000)
                .collect::<Vec<_>>(),
            vec![4, 3]
        );
        let (page, more) = m.list("pere@localhost", 4, 2).unwrap();
        assert!(!more);
        assert_eq!(page.len(), 1);
        assert!(m.list("nobody-yet@localhost", 0, 2).unwrap().0.is_empty());
    }
}
