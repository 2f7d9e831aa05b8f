//! The embedded backend for `correu serve`: a Postfix-style spool directory.
//!
//! Why a directory and not an embedded database: a message is written once
//! and read once, so a file per message is the whole data structure; the
//! rename that makes it visible is atomic; `kill -9` can leave at worst a
//! file in `tmp/`, which is not yet acknowledged to anyone; and an operator
//! can see, count and move messages with `ls` and `mv`.
//!
//! Layout under `queue.spool`:
//! - `tmp/`: files being written; never read, cleaned at start.
//! - `active/ID`: waiting for delivery (protobuf `QueuedMessage`).
//! - `deferred/DUE-ID`: waiting for a retry; `DUE` is the Unix time in
//!   milliseconds when it moves back to `active/`.
//! - `parked/ID` and `parked/ID.reason`: what could not be processed.
//!
//! Publishing writes `tmp/ID`, fsyncs it, renames it into `active/` and
//! fsyncs the directory: only then does the caller get `Ok`.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_proto::v1::QueuedMessage;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Delivery, Handle, PublishError, QueueError, id::is_queue_id};

/// Most ids taken from one directory scan; bounds memory however long the
/// queue is.
const SCAN_BATCH: usize = 1024;
/// How often a consumer with nothing to do looks for due retries.
const IDLE_POLL: Duration = Duration::from_millis(500);

pub struct Spool {
    root: PathBuf,
    notify: Notify,
    /// Ids handed out and not yet settled; a scan skips them.
    inflight: Mutex<HashSet<String>>,
    /// Ids found by the last scan, not yet handed out.
    pending: Mutex<VecDeque<String>>,
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Writes `data` to `tmp/name`, fsyncs, renames to `dest`, fsyncs `dest`'s folder.
fn write_durably(root: &Path, name: &str, data: &[u8], dest: &Path) -> std::io::Result<()> {
    let tmp = root.join("tmp").join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dest)?;
    sync_dir(dest.parent().unwrap_or(root))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data
    // behind, still consistent; keep going with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Spool {
    /// Opens (creating) the spool and clears `tmp/` of unfinished writes:
    /// for the one process that serves it.
    pub async fn open(root: &Path) -> std::io::Result<Spool> {
        Self::open_inner(root, true).await
    }

    /// Opens the spool of a running server, for the admin command: `tmp/`
    /// is the server's and is left alone.
    pub async fn open_for_admin(root: &Path) -> std::io::Result<Spool> {
        if !root.join("active").is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no spool at {} (queue.spool)", root.display()),
            ));
        }
        Self::open_inner(root, false).await
    }

    async fn open_inner(root: &Path, owner: bool) -> std::io::Result<Spool> {
        let root = root.to_path_buf();
        let r = root.clone();
        tokio::task::spawn_blocking(move || {
            for d in ["tmp", "active", "deferred", "parked"] {
                std::fs::create_dir_all(r.join(d))?;
            }
            if owner {
                for e in std::fs::read_dir(r.join("tmp"))? {
                    std::fs::remove_file(e?.path())?;
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Spool {
            root,
            notify: Notify::new(),
            inflight: Mutex::new(HashSet::new()),
            pending: Mutex::new(VecDeque::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn publish(&self, msg: &QueuedMessage) -> Result<(), PublishError> {
        if !is_queue_id(&msg.queue_id) {
            return Err(PublishError::Unavailable(format!(
                "not a queue id: {:?}",
                msg.queue_id
            )));
        }
        let data = msg.encode_to_vec();
        let root = self.root.clone();
        let id = msg.queue_id.clone();
        tokio::task::spawn_blocking(move || {
            let dest = root.join("active").join(&id);
            write_durably(&root, &id, &data, &dest)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.notify.notify_one();
        Ok(())
    }

    /// Moves due deferred messages back to `active/`, and lists up to a
    /// batch of active ids that are not in flight.
    fn scan(&self) -> std::io::Result<Vec<String>> {
        let now = now_millis();
        for e in std::fs::read_dir(self.root.join("deferred"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((due, id)) = name.split_once('-') else {
                continue;
            };
            if due.parse::<u128>().is_ok_and(|d| d <= now) && is_queue_id(id) {
                std::fs::rename(e.path(), self.root.join("active").join(id))?;
            }
        }
        let inflight = lock(&self.inflight).clone();
        let mut found = Vec::new();
        for e in std::fs::read_dir(self.root.join("active"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if is_queue_id(&name) && !inflight.contains(&name) {
                found.push(name);
                if found.len() >= SCAN_BATCH {
                    break;
                }
            }
        }
        // Oldest first: ids sort by time.
        found.sort();
        Ok(found)
    }

    fn take_pending(&self) -> Option<String> {
        let mut pending = lock(&self.pending);
        let mut inflight = lock(&self.inflight);
        while let Some(id) = pending.pop_front() {
            if inflight.insert(id.clone()) {
                return Some(id);
            }
        }
        None
    }

    fn settle(&self, id: &str) {
        lock(&self.inflight).remove(id);
    }

    /// Counts per directory, for the admin command and tests.
    pub fn counts(&self) -> std::io::Result<SpoolCounts> {
        let count = |dir: &str, id_of: fn(&str) -> &str| -> std::io::Result<usize> {
            let mut n = 0;
            for e in std::fs::read_dir(self.root.join(dir))? {
                if is_queue_id(id_of(&e?.file_name().to_string_lossy())) {
                    n += 1;
                }
            }
            Ok(n)
        };
        Ok(SpoolCounts {
            active: count("active", |n| n)?,
            deferred: count("deferred", |n| n.split_once('-').map_or("", |(_, id)| id))?,
            parked: count("parked", |n| n)?,
        })
    }
}

impl Spool {
    /// The deferred messages, from their files.
    pub fn deferred(&self) -> std::io::Result<Vec<crate::admin::Deferred>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join("deferred"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((due, id)) = name.split_once('-') else {
                continue;
            };
            if !is_queue_id(id) {
                continue;
            }
            let due: i64 = due.parse().unwrap_or(0);
            match std::fs::read(e.path()).map(|raw| QueuedMessage::decode(raw.as_slice())) {
                Ok(Ok(msg)) => out.push(crate::admin::Deferred::from_message(&msg, due)),
                // Taken back by a consumer meanwhile, or unreadable: skip.
                _ => continue,
            }
        }
        Ok(out)
    }

    /// Moves deferred messages to `active/` now.
    pub fn retry_now(&self, which: crate::admin::Which<'_>) -> std::io::Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(self.root.join("deferred"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((_, id)) = name.split_once('-') else {
                continue;
            };
            if is_queue_id(id) && which.matches(id) {
                std::fs::rename(e.path(), self.root.join("active").join(id))?;
                n += 1;
            }
        }
        if n > 0 {
            sync_dir(&self.root.join("active"))?;
            self.notify.notify_one();
        }
        Ok(n)
    }

    /// Deletes a message wherever it waits (not one being delivered).
    pub fn delete(&self, id: &str) -> std::io::Result<usize> {
        if !is_queue_id(id) || lock(&self.inflight).contains(id) {
            return Ok(0);
        }
        let mut n = 0;
        for dir in ["active", "parked"] {
            match std::fs::remove_file(self.root.join(dir).join(id)) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let _reason = std::fs::remove_file(self.root.join("parked").join(format!("{id}.reason")));
        for e in std::fs::read_dir(self.root.join("deferred"))? {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(&format!("-{id}")) {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Gives parked messages back to delivery.
    pub fn requeue_parked(&self, which: crate::admin::Which<'_>) -> std::io::Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(self.root.join("parked"))? {
            let e = e?;
            let id = e.file_name().to_string_lossy().into_owned();
            if is_queue_id(&id) && which.matches(&id) {
                std::fs::rename(e.path(), self.root.join("active").join(&id))?;
                let _reason =
                    std::fs::remove_file(self.root.join("parked").join(format!("{id}.reason")));
                n += 1;
            }
        }
        if n > 0 {
            sync_dir(&self.root.join("active"))?;
            self.notify.notify_one();
        }
        Ok(n)
    }
}

/// How many messages wait where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolCounts {
    pub active: usize,
    pub deferred: usize,
    pub parked: usize,
}

pub struct SpoolConsumer {
    spool: Arc<Spool>,
}

impl SpoolConsumer {
    pub fn new(spool: Arc<Spool>) -> Self {
        SpoolConsumer { spool }
    }

    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if let Some(id) = self.spool.take_pending() {
                let path = self.spool.root.join("active").join(&id);
                match tokio::fs::read(&path).await {
                    Ok(raw) => {
                        let message = QueuedMessage::decode(raw.as_slice()).ok();
                        return Some(Delivery {
                            message,
                            raw,
                            handle: Handle::Spool(SpoolHandle {
                                spool: self.spool.clone(),
                                id,
                            }),
                        });
                    }
                    // Settled by another consumer since the scan.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.spool.settle(&id);
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot read spool file");
                        self.spool.settle(&id);
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(IDLE_POLL) => continue,
                        }
                    }
                }
            }
            let spool = self.spool.clone();
            let found = tokio::task::spawn_blocking(move || spool.scan()).await;
            match found {
                Ok(Ok(ids)) if !ids.is_empty() => {
                    lock(&self.spool.pending).extend(ids);
                    continue;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot scan the spool"),
                Err(e) => tracing::error!(error = %e, "spool scan task failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.spool.notify.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

pub(crate) struct SpoolHandle {
    spool: Arc<Spool>,
    id: String,
}

impl SpoolHandle {
    fn active(&self) -> PathBuf {
        self.spool.root.join("active").join(&self.id)
    }

    /// Leaves the file in `active/` and lets the next scan hand it out again.
    pub(crate) fn release(self) {
        self.spool.settle(&self.id);
        self.spool.notify.notify_one();
    }

    pub(crate) async fn ack(self) -> Result<(), QueueError> {
        let path = self.active();
        // Unlinking needs no fsync: if it is lost in a crash, the message is
        // delivered again, and delivery is idempotent.
        let r = tokio::fs::remove_file(&path).await;
        self.spool.settle(&self.id);
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn retry(
        self,
        updated: &QueuedMessage,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let due = now_millis() + delay.as_millis();
        let data = updated.encode_to_vec();
        let root = self.spool.root.clone();
        let id = self.id.clone();
        let written = tokio::task::spawn_blocking(move || {
            let dest = root.join("deferred").join(format!("{due:015}-{id}"));
            write_durably(&root, &format!("{id}.retry"), &data, &dest)
        })
        .await
        .map_err(std::io::Error::other)?;
        match written {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.spool.settle(&self.id);
                Err(e.into())
            }
        }
    }

    pub(crate) async fn park(self, reason: &str) -> Result<(), QueueError> {
        let root = self.spool.root.clone();
        let id = self.id.clone();
        let reason = reason.to_string();
        let r = tokio::task::spawn_blocking(move || {
            let parked = root.join("parked");
            write_durably(
                &root,
                &format!("{id}.reason"),
                reason.as_bytes(),
                &parked.join(format!("{id}.reason")),
            )?;
            std::fs::rename(root.join("active").join(&id), parked.join(&id))?;
            sync_dir(&parked)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.spool.settle(&self.id);
        Ok(r?)
    }
}
