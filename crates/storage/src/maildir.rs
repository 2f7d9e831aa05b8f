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

use std::collections::HashMap;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::accounts::{Directory, Resolved};

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
    #[error("mailbox {0} is over its quota")]
    OverQuota(String),
    #[error("mailbox I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The outcome of a delivery to one mailbox.
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

/// What a mailbox holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub bytes: u64,
}

/// How a recipient stands, for `CheckRecipient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Its mailboxes (some with room), and the addresses of other domains
    /// it forwards to.
    Exists {
        mailboxes: Vec<String>,
        forward: Vec<String>,
    },
    OverQuota(Vec<String>),
    Unknown,
}

/// The mailboxes under one root, and who has one.
pub struct Mailboxes {
    root: PathBuf,
    host: String,
    directory: Directory,
    /// One flusher per `new/` directory, shared by concurrent deliveries.
    syncs: Mutex<HashMap<PathBuf, Arc<DirSync>>>,
}

/// Group commit for a directory's fsync: deliveries that linked a file
/// while a flush of the same directory was already running wait for the
/// next flush, which covers them all, instead of each flushing in turn.
#[derive(Default)]
struct DirSync {
    /// Links made so far (each caller takes a number after its link).
    requested: AtomicU64,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Every link numbered up to this is flushed.
    flushed: u64,
    running: bool,
}

impl DirSync {
    /// Returns once a flush that began after this call's link has ended.
    /// The directory is opened for each flush (a handle kept open would be
    /// a descriptor per mailbox, and could outlive a directory made anew).
    fn sync(&self, dir: &Path) -> std::io::Result<()> {
        let mine = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = lock(&self.state);
        loop {
            if st.flushed >= mine {
                return Ok(());
            }
            if st.running {
                st = self
                    .done
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            st.running = true;
            let covers = self.requested.load(Ordering::SeqCst);
            drop(st);
            let r = sync_dir(dir);
            st = lock(&self.state);
            st.running = false;
            if r.is_ok() {
                st.flushed = st.flushed.max(covers);
            }
            self.done.notify_all();
            // A failed flush is reported to its caller; the waiters try
            // their own.
            r?;
        }
    }
}

use correu_runtime::sync::{create_private, create_private_dirs, lock, sync_dir, write_private};

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

/// Where in a mailbox a message is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    Inbox,
    /// Maildir++ `.Junk/`, which Dovecot shows as the Junk folder.
    Junk,
}

impl Folder {
    /// From a request: empty or `INBOX` for the inbox, `Junk`.
    pub fn parse(name: &str) -> Result<Folder, MailboxError> {
        match name {
            "" | "INBOX" => Ok(Folder::Inbox),
            "Junk" => Ok(Folder::Junk),
            other => Err(MailboxError::Invalid(format!(
                "unknown folder {:?} (\"\" or \"Junk\")",
                other.escape_debug().to_string()
            ))),
        }
    }

    fn subdir(self) -> Option<&'static str> {
        match self {
            Folder::Inbox => None,
            Folder::Junk => Some(".Junk"),
        }
    }
}

/// Where the mailbox of `address` lives under the root: `domain/local`,
/// both lower-cased, the local part encoded by [`encode_local`]. Always
/// exactly two plain path components that stay under the root (no `..`,
/// no separator, no leading dot), and two addresses share a directory
/// only if they are the same address ignoring case.
pub fn relative_dir(address: &str) -> Result<PathBuf, MailboxError> {
    let (local, domain) = Mailboxes::split(address)?;
    if domain.contains(['/', '\\', '\0']) || domain.starts_with('.') {
        return Err(MailboxError::UnknownRecipient(address.to_string()));
    }
    Ok(PathBuf::from(domain).join(encode_local(&local)))
}

/// A message id names a file in `new/` or `cur/`: no separators or flags.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 255
        && !id.contains(['/', '\\', ':', '\0'])
}

/// The size a Maildir name carries (`,S=1234`), Dovecot's way.
fn size_in_name(name: &str) -> Option<u64> {
    let (_, s) = name.split_once(",S=")?;
    s.split([',', ':']).next()?.parse().ok()
}

/// A name no other writer uses at the same time: this process's id and a
/// counter, so two threads (or replicas) never share a file in `tmp/`.
fn unique(base: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{base}.{}_{n}", std::process::id())
}

/// Maildir++ (and Dovecot) recalculate `maildirsize` past this size.
const MAILDIRSIZE_MAX: u64 = 5120;

/// The standard Maildir flags, in the order they are written.
const FLAGS: &str = "DFPRST";

impl Mailboxes {
    pub fn new(root: &Path, host: &str, directory: Directory) -> Self {
        Mailboxes {
            root: root.to_path_buf(),
            // The host part of a Maildir name may not hold '/' or ':'.
            host: host.replace(['/', ':'], "_"),
            directory,
            syncs: Mutex::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Mailboxes known: the directory's, or in open mode the mailbox
    /// folders on disk (`<root>/<domain>/<local-part>`).
    pub fn mailbox_count(&self) -> usize {
        if let Some(n) = self.directory.mailbox_count() {
            return n;
        }
        let Ok(domains) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        domains
            .filter_map(Result::ok)
            .filter_map(|d| std::fs::read_dir(d.path()).ok())
            .map(|boxes| {
                boxes
                    .filter_map(Result::ok)
                    .filter(|b| b.file_type().is_ok_and(|t| t.is_dir()))
                    .count()
            })
            .sum()
    }

    fn split(address: &str) -> Result<(String, String), MailboxError> {
        let (local, domain) = address
            .rsplit_once('@')
            .filter(|(l, d)| !l.is_empty() && !d.is_empty())
            .ok_or_else(|| MailboxError::Invalid(format!("not an address: {address:?}")))?;
        Ok((local.to_lowercase(), domain.to_lowercase()))
    }

    /// The directory of a mailbox (an address that has one).
    fn dir_of(&self, mailbox: &str) -> Result<PathBuf, MailboxError> {
        Ok(self.root.join(relative_dir(mailbox)?))
    }

    /// The mailbox directory of `address`, which must have a mailbox of
    /// its own (not only an alias).
    pub fn resolve(&self, address: &str) -> Result<PathBuf, MailboxError> {
        let (local, domain) = Self::split(address)?;
        let address = format!("{local}@{domain}");
        if !self.directory.is_mailbox(&address) {
            return Err(MailboxError::UnknownRecipient(address));
        }
        self.dir_of(&address)
    }

    /// The mailboxes a recipient leads to (one that only forwards to
    /// other domains leads to none here: unknown).
    pub fn mailboxes_of(&self, recipient: &str) -> Result<Vec<String>, MailboxError> {
        Self::split(recipient)?;
        match self.directory.resolve(recipient) {
            Resolved::Targets { mailboxes, .. } if !mailboxes.is_empty() => Ok(mailboxes),
            _ => Err(MailboxError::UnknownRecipient(recipient.to_string())),
        }
    }

    /// [`Mailboxes::standing`] when it needs no disk (no mailbox it leads to
    /// has a quota), so a caller can skip the blocking pool; `None` otherwise.
    pub fn standing_in_memory(&self, recipient: &str) -> Option<Result<Standing, MailboxError>> {
        if let Err(e) = Self::split(recipient) {
            return Some(Err(e));
        }
        match self.directory.resolve(recipient) {
            Resolved::Unknown => Some(Ok(Standing::Unknown)),
            Resolved::Targets { mailboxes, forward } => (!forward.is_empty()
                || mailboxes.iter().all(|b| self.directory.quota(b) == 0))
            .then_some(Ok(Standing::Exists { mailboxes, forward })),
        }
    }

    /// Whether mail for `recipient` of `size` octets (as MAIL FROM's SIZE=
    /// declared it; 0 when not) can be taken now: it forwards to another
    /// domain, or leads to a mailbox with room for it (RFC 1870: a message
    /// that cannot fit is refused at RCPT, not after DATA).
    pub fn standing(&self, recipient: &str, size: u64) -> Result<Standing, MailboxError> {
        Self::split(recipient)?;
        let (mailboxes, forward) = match self.directory.resolve(recipient) {
            Resolved::Unknown => return Ok(Standing::Unknown),
            Resolved::Targets { mailboxes, forward } => (mailboxes, forward),
        };
        if !forward.is_empty() {
            return Ok(Standing::Exists { mailboxes, forward });
        }
        for b in &mailboxes {
            let quota = self.directory.quota(b);
            if quota == 0 {
                return Ok(Standing::Exists { mailboxes, forward });
            }
            let used = self.usage_of(&self.dir_of(b)?, quota)?.bytes;
            if used < quota && used.saturating_add(size) <= quota {
                return Ok(Standing::Exists { mailboxes, forward });
            }
        }
        Ok(Standing::OverQuota(mailboxes))
    }

    /// Stores `content` for `recipient` in the inbox of every mailbox it
    /// leads to, once per (queue id, mailbox). Blocking: call it from
    /// `spawn_blocking`.
    pub fn deliver(
        &self,
        queue_id: &str,
        sender: &str,
        recipient: &str,
        content: &[u8],
        received_at_unix_micros: i64,
    ) -> Result<Vec<Delivered>, MailboxError> {
        self.deliver_in(
            Folder::Inbox,
            queue_id,
            sender,
            recipient,
            content,
            received_at_unix_micros,
        )
    }

    /// [`Mailboxes::deliver`], into `folder` of each mailbox.
    pub fn deliver_in(
        &self,
        folder: Folder,
        queue_id: &str,
        sender: &str,
        recipient: &str,
        content: &[u8],
        received_at_unix_micros: i64,
    ) -> Result<Vec<Delivered>, MailboxError> {
        if !valid_id(queue_id) || queue_id.contains('.') {
            return Err(MailboxError::Invalid(format!("bad queue id {queue_id:?}")));
        }
        let boxes = self.mailboxes_of(recipient)?;
        boxes
            .iter()
            .map(|b| {
                self.deliver_to(
                    folder,
                    queue_id,
                    sender,
                    b,
                    content,
                    received_at_unix_micros,
                )
            })
            .collect()
    }

    fn deliver_to(
        &self,
        folder: Folder,
        queue_id: &str,
        sender: &str,
        mailbox: &str,
        content: &[u8],
        received_at_unix_micros: i64,
    ) -> Result<Delivered, MailboxError> {
        // The quota (`maildirsize`) is the mailbox's, folders included;
        // the file goes to the folder's own Maildir.
        let root = self.dir_of(mailbox)?;
        let dir = match folder.subdir() {
            Some(sub) => root.join(sub),
            None => root.clone(),
        };
        let key = format!("{queue_id}_{:016x}", fnv1a(mailbox));
        let marker_dir = self
            .root
            .join(".correu")
            .join("delivered")
            .join(&queue_id[..queue_id.len().min(8)]);
        let marker = marker_dir.join(&key);
        if let Ok(id) = std::fs::read_to_string(&marker) {
            return Ok(Delivered {
                mailbox: mailbox.to_string(),
                message_id: id,
                duplicate: true,
            });
        }
        // Return-Path and Delivered-To (RFC 5321 §4.4, RFC 9228) come first.
        let head = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            correu_smtp::headers::field_value(sender),
            correu_smtp::headers::field_value(mailbox)
        )
        .into_bytes();
        let size = head.len() + content.len();
        let quota = self.directory.quota(mailbox);
        if quota > 0 {
            // The mailbox exists before its usage is read, so that its
            // `maildirsize` is made by the first delivery, before any file
            // it could count twice (see `usage_of`).
            self.make_dirs(&root)?;
        }
        if folder != Folder::Inbox {
            self.make_folder(&dir)?;
        }
        if quota > 0 && self.usage_of(&root, quota)?.bytes + size as u64 > quota {
            return Err(MailboxError::OverQuota(mailbox.to_string()));
        }
        let secs = received_at_unix_micros.div_euclid(1_000_000);
        let name = format!("{secs}.{key}.{},S={size}", self.host);
        let tmp = dir.join("tmp").join(unique(&name));
        let mut f = match create_private(&tmp) {
            Ok(f) => f,
            // A mailbox's first message makes its directories.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.make_dirs(&dir)?;
                create_private(&tmp)?
            }
            Err(e) => return Err(e.into()),
        };
        if content.len() > 64 << 10 {
            // Large: two writes rather than another copy of the message.
            f.write_all(&head)?;
            f.write_all(content)?;
        } else {
            let mut text = head;
            text.extend_from_slice(content);
            f.write_all(&text)?;
        }
        f.sync_all()?;
        drop(f);
        let new = dir.join("new").join(&name);
        let mut linked = std::fs::hard_link(&tmp, &new);
        if matches!(&linked, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            // `tmp/` is there but `new/` is not (made by hand, or a crash
            // between the two): make it and link again.
            self.make_dirs(&dir)?;
            linked = std::fs::hard_link(&tmp, &new);
        }
        let duplicate = match linked {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => true,
            Err(e) => {
                let _cleanup = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        std::fs::remove_file(&tmp)?;
        self.sync_new(&dir)?;
        if !duplicate && quota > 0 {
            self.count(&root, size as i64, 1)?;
        }
        if let Err(e) = write_private(&marker, name.as_bytes()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e.into());
            }
            create_private_dirs(&marker_dir)?;
            write_private(&marker, name.as_bytes())?;
        }
        Ok(Delivered {
            mailbox: mailbox.to_string(),
            message_id: name,
            duplicate,
        })
    }

    /// A Maildir++ folder (`.Junk/`): its own `tmp`, `new`, `cur`, and the
    /// `maildirfolder` file that marks it as a folder of the mailbox above
    /// (Dovecot and Courier read quotas from there).
    fn make_folder(&self, dir: &Path) -> std::io::Result<()> {
        let mark = dir.join("maildirfolder");
        if mark.exists() {
            return Ok(());
        }
        self.make_dirs(dir)?;
        write_private(&mark, b"")
    }

    fn make_dirs(&self, dir: &Path) -> std::io::Result<()> {
        for sub in ["tmp", "new", "cur"] {
            create_private_dirs(&dir.join(sub))?;
        }
        Ok(())
    }

    /// Flushes a mailbox's `new/`, together with concurrent deliveries to it.
    fn sync_new(&self, dir: &Path) -> std::io::Result<()> {
        let new = dir.join("new");
        let sync = lock(&self.syncs).entry(new.clone()).or_default().clone();
        let r = sync.sync(&new);
        // Forgotten once nobody else uses it, so the map holds only the
        // mailboxes being delivered to. (Removing it early costs at most a
        // shared flush: each flush still covers its own callers.)
        let mut syncs = lock(&self.syncs);
        if syncs.get(&new).is_some_and(|s| Arc::ptr_eq(s, &sync)) && Arc::strong_count(&sync) == 2 {
            syncs.remove(&new);
        }
        r
    }

    /// Appends a change to `maildirsize` when the mailbox keeps one
    /// (Maildir++: one short line per change, appended in one write).
    fn count(&self, dir: &Path, bytes: i64, messages: i64) -> std::io::Result<()> {
        let path = dir.join("maildirsize");
        match std::fs::OpenOptions::new().append(true).open(&path) {
            Ok(mut f) => f.write_all(format!("{bytes} {messages}\n").as_bytes()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Counts what the Maildir's `new/` and `cur/` hold.
    fn scan(dir: &Path) -> std::io::Result<Usage> {
        let mut u = Usage {
            messages: 0,
            bytes: 0,
        };
        for sub in ["new", "cur"] {
            let entries = match std::fs::read_dir(dir.join(sub)) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') {
                    continue;
                }
                u.messages += 1;
                u.bytes += match size_in_name(&name) {
                    Some(s) => s,
                    None => e.metadata()?.len(),
                };
            }
        }
        Ok(u)
    }

    /// A mailbox's usage: from Maildir++ `maildirsize` when it is there,
    /// short and for this quota; else counted and `maildirsize` rewritten
    /// (when there is a quota to keep).
    fn usage_of(&self, dir: &Path, quota: u64) -> Result<Usage, MailboxError> {
        let path = dir.join("maildirsize");
        let read = if quota > 0 {
            std::fs::read_to_string(&path)
        } else {
            Err(std::io::ErrorKind::Unsupported.into())
        };
        let missing = matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if let Ok(text) = &read
            && (text.len() as u64) <= MAILDIRSIZE_MAX
            && let Some((first, rest)) = text.split_once('\n')
            && first.split(',').any(|f| f == format!("{quota}S"))
        {
            let (mut bytes, mut messages) = (0i64, 0i64);
            for line in rest.lines() {
                let mut it = line.split_whitespace();
                if let (Some(b), Some(m)) = (it.next(), it.next())
                    && let (Ok(b), Ok(m)) = (b.parse::<i64>(), m.parse::<i64>())
                {
                    bytes += b;
                    messages += m;
                }
            }
            return Ok(Usage {
                messages: messages.max(0) as u64,
                bytes: bytes.max(0) as u64,
            });
        }
        let u = Self::scan(dir)?;
        if quota > 0 && dir.exists() {
            let line = format!("{quota}S\n{} {}\n", u.bytes, u.messages);
            let tmp = dir.join("tmp").join(unique("maildirsize"));
            create_private_dirs(&dir.join("tmp"))?;
            write_private(&tmp, line.as_bytes())?;
            if !missing {
                // Stale (too long, or for another quota): recalculated, as
                // Maildir++ does.
                std::fs::rename(&tmp, &path)?;
            } else {
                // Linked in whole, and only if absent: the first one made
                // wins and the others count from it (a delivery appends
                // only once the file exists, so no change falls between
                // the count and the file).
                let linked = std::fs::hard_link(&tmp, &path);
                std::fs::remove_file(&tmp)?;
                match linked {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return self.usage_of(dir, quota);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(u)
    }

    /// After the accounts file changed (`before` is what it held, `now`
    /// what it holds), the `maildirsize` of each mailbox whose quota
    /// changed is rewritten at once, so that Dovecot, which reads the
    /// quota from it, does not keep the old one until the next delivery;
    /// one whose quota went away is removed (Dovecot recounts). Returns
    /// how many were looked at. Blocking.
    pub fn refresh_changed_quotas(
        &self,
        before: &HashMap<String, crate::accounts::Account>,
        now: &HashMap<String, crate::accounts::Account>,
    ) -> usize {
        let d = &self.directory;
        let mut n = 0;
        for (address, account) in now {
            let quota = d.quota_of(account);
            // A new account (`correu account del` then `add`) whose
            // Maildir has a `maildirsize` is checked too: usage_of
            // rewrites it only when its header names another quota.
            let old = before.get(address).map(|a| d.quota_of(a));
            if old == Some(quota) || (old.is_none() && quota == 0) {
                continue;
            }
            let Ok(dir) = self.dir_of(address) else {
                continue;
            };
            let file = dir.join("maildirsize");
            if !file.exists() {
                continue;
            }
            let done = if quota == 0 {
                std::fs::remove_file(&file).map_err(MailboxError::from)
            } else {
                self.usage_of(&dir, quota).map(|_| ())
            };
            match done {
                Ok(()) => {
                    tracing::info!(mailbox = %address, quota, "quota changed: maildirsize rewritten");
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(mailbox = %address, error = %e, "quota changed, and maildirsize could not be rewritten")
                }
            }
        }
        n
    }

    /// Count, bytes and quota of the mailbox of `address`.
    pub fn stats(&self, address: &str) -> Result<(Usage, u64), MailboxError> {
        let dir = self.resolve(address)?;
        let mailbox = address.to_lowercase();
        let quota = self.directory.quota(&mailbox);
        // The count of messages is always exact: from the directories.
        let scanned = Self::scan(&dir)?;
        Ok((scanned, quota))
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
        // Names only (the time leads each name), then only the page is
        // parsed further: a mailbox of 100,000 costs one pass and a
        // partial selection, not a full sort.
        let subs = ["new", "cur"];
        let mut all: Vec<(i64, String, usize)> = Vec::new();
        for (n, sub) in subs.iter().enumerate() {
            let entries = match std::fs::read_dir(dir.join(sub)) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for e in entries {
                let e = e?;
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                let secs: i64 = name
                    .split('.')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                all.push((secs, name, n));
            }
        }
        let newest_first = |a: &(i64, String, usize), b: &(i64, String, usize)| {
            b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1))
        };
        let more = all.len() > offset + limit;
        let wanted = (offset + limit).min(all.len());
        if wanted < all.len() && wanted > 0 {
            all.select_nth_unstable_by(wanted - 1, newest_first);
            all.truncate(wanted);
        }
        all.sort_unstable_by(newest_first);
        let mut page = Vec::with_capacity(limit.min(all.len()));
        for (secs, name, sub) in all.into_iter().skip(offset).take(limit) {
            let (id, flags) = match name.split_once(":2,") {
                Some((id, f)) => (id.to_string(), f.to_string()),
                None => (name.clone(), String::new()),
            };
            let size = match size_in_name(&id) {
                Some(s) => s,
                None => std::fs::metadata(dir.join(subs[sub]).join(&name)).map_or(0, |m| m.len()),
            };
            page.push(Listed {
                id,
                size,
                received_at_unix_micros: secs * 1_000_000,
                flags,
            });
        }
        Ok((page, more))
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
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) || name == id {
                    return Ok(e.path());
                }
            }
        }
        Err(MailboxError::NoMessage(id.to_string()))
    }

    /// Removes message `id`.
    pub fn delete(&self, address: &str, id: &str) -> Result<(), MailboxError> {
        let path = self.find(address, id)?;
        let size =
            size_in_name(id).map_or_else(|| std::fs::metadata(&path).map(|m| m.len()), Ok)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            // Removed meanwhile (another replica, or Dovecot): not ours to count.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MailboxError::NoMessage(id.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        // The file was in MAILDIR/new or MAILDIR/cur.
        let sub = path.parent().unwrap_or(&path);
        sync_dir(sub)?;
        if let Some(maildir) = sub.parent() {
            self.count(maildir, -(size as i64), -1)?;
        }
        Ok(())
    }

    /// Gives message `id` exactly `flags` (standard Maildir flags, any
    /// order); the message moves to `cur/`. Returns the flags as written.
    pub fn set_flags(&self, address: &str, id: &str, flags: &str) -> Result<String, MailboxError> {
        if let Some(bad) = flags.chars().find(|c| !FLAGS.contains(*c)) {
            return Err(MailboxError::Invalid(format!(
                "unknown flag {bad:?} (flags are {FLAGS})"
            )));
        }
        let sorted: String = FLAGS.chars().filter(|c| flags.contains(*c)).collect();
        let from = self.find(address, id)?;
        let dir = self.resolve(address)?;
        create_private_dirs(&dir.join("cur"))?;
        let to = dir.join("cur").join(format!("{id}:2,{sorted}"));
        if from != to {
            std::fs::rename(&from, &to).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => MailboxError::NoMessage(id.to_string()),
                _ => e.into(),
            })?;
            sync_dir(&dir.join("cur"))?;
        }
        Ok(sorted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(root: &Path, accounts: &[&str]) -> Mailboxes {
        let accounts: Vec<String> = accounts.iter().map(|s| s.to_string()).collect();
        Mailboxes::new(
            root,
            "mx.test",
            Directory::new(&["localhost".into()], None, None, &accounts, 0),
        )
    }

    /// Concurrent deliveries share the flushes of `new/`: every one returns
    /// with its file there, none is lost or doubled.
    #[test]
    fn concurrent_deliveries_to_one_mailbox_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(boxes(dir.path(), &["pere@localhost"]));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let id = format!("0T{t}X{i:03}");
                        let d = m.deliver(&id, "", "pere@localhost", b"x\r\n", 0).unwrap();
                        assert!(!d[0].duplicate);
                        let new = m.root().join("localhost/pere/new").join(&d[0].message_id);
                        assert!(new.exists(), "{id} is in new/ when deliver returns");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let names = std::fs::read_dir(dir.path().join("localhost/pere/new")).unwrap();
        assert_eq!(names.count(), 200);
        assert!(
            lock(&m.syncs).is_empty(),
            "no flusher kept for an idle mailbox"
        );
    }

    #[test]
    fn a_mailbox_missing_new_gets_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let m = boxes(dir.path(), &["pere@localhost"]);
        m.deliver("0AAA", "", "pere@localhost", b"x\r\n", 0)
            .unwrap();
        let new = dir.path().join("localhost/pere/new");
        std::fs::remove_dir_all(&new).unwrap();
        let d = m
            .deliver("0BBB", "", "pere@localhost", b"y\r\n", 0)
            .unwrap();
        assert!(new.join(&d[0].message_id).exists());
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
            .unwrap()
            .remove(0);
        assert!(!first.duplicate);
        let again = m
            .deliver(
                "0ABC",
                "jo@domini.com",
                "Pere@localhost",
                b"Subject: x\r\n\r\nhi\r\n",
                1_700_000_000_000_000,
            )
            .unwrap()
            .remove(0);
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
            .unwrap()
            .remove(0);
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
            .unwrap()
            .remove(0);
        let mbox = dir.path().join("localhost/pere");
        std::fs::rename(
            mbox.join("new").join(&d.message_id),
            mbox.join("cur").join(format!("{}:2,S", d.message_id)),
        )
        .unwrap();
        assert!(
            m.deliver("0ABC", "", "pere@localhost", b"x\r\n", 0)
                .unwrap()[0]
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
