//! The embedded backend for `correu serve`: a Postfix-style spool directory.
//!
//! Why a directory and not an embedded database: a message is written once
//! and read once, so a file per message is the whole data structure; the
//! rename that makes it visible is atomic; `kill -9` can leave at worst a
//! file in `tmp/`, which is not yet acknowledged to anyone; and an operator
//! can see, count and move messages with `ls` and `mv`.
//!
//! Layout under `queue.spool`:
//! - `journal/`: new messages, appended and flushed in groups by one writer
//!   thread (see [`crate::journal`]); this is where ingress's `250` comes
//!   from, and delivery takes them from memory.
//! - `tmp/`: files being written; never read, cleaned at start.
//! - `active/ID`: waiting for delivery (protobuf `QueuedMessage`): messages
//!   back from `deferred/` or `parked/`, or put there by hand.
//! - `deferred/DUE-ID`: waiting for a retry; `DUE` is the Unix time in
//!   milliseconds when it moves back to `active/`.
//! - `parked/ID` and `parked/ID.reason`: what could not be processed.
//!
//! Publishing appends to the journal and returns once the journal is
//! flushed. Every other move (retry, park) writes `tmp/NAME`, fsyncs it,
//! renames it into place and fsyncs the directory before the journal record
//! or the old file is let go.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use correu_proto::v1::QueuedMessage;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::journal::{self, Journal, Location};
use crate::{Delivery, Handle, PublishError, QueueError, id::is_queue_id};

/// Most ids taken from one directory scan; bounds memory however long the
/// queue is.
const SCAN_BATCH: usize = 1024;
/// How often a consumer with nothing to do looks for due retries.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// How long a message waits to be handed out again after `failures`
/// failed settles in a row: doubling from half a second to a minute.
fn settle_backoff(failures: u32) -> Duration {
    let steps = failures.saturating_sub(1).min(7);
    (IDLE_POLL * 2u32.pow(steps)).min(Duration::from_secs(60))
}

pub struct Spool {
    root: PathBuf,
    state: Arc<State>,
    /// The intake journal's writer; `None` for the admin command's view.
    journal: Option<Journal>,
    /// `lock`, held while this process owns the spool: two servers on one
    /// spool would hand out, and collect, each other's journal.
    _owner: Option<std::fs::File>,
}

/// What the publishers, the journal writer and the consumers share.
#[derive(Default)]
struct State {
    notify: Notify,
    /// Ids handed out and not yet settled; a scan skips them.
    inflight: Mutex<HashSet<String>>,
    /// Messages to hand out, oldest first.
    pending: Mutex<VecDeque<(String, Source)>>,
    /// Bytes of journal messages held in `pending`.
    held: AtomicUsize,
    /// Failed settles in a row, per message: the next try waits longer.
    settle_failures: Mutex<std::collections::HashMap<String, u32>>,
}

/// Where a message to hand out is.
enum Source {
    /// `active/ID`.
    File,
    /// The journal, with its bytes when they are still in memory.
    Journal(Location, Option<Vec<u8>>),
}

/// Most bytes of new messages kept in memory for delivery; past it they are
/// read back from the journal (a backlog costs disk reads, not memory).
const HOLD_BYTES: usize = 64 << 20;

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Writes `data` to `tmp/name`, fsyncs, renames to `dest`, fsyncs `dest`'s folder.
fn write_durably(root: &Path, name: &str, data: &[u8], dest: &Path) -> std::io::Result<()> {
    let tmp = root.join("tmp").join(name);
    let mut f = create_private(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dest)?;
    sync_dir(dest.parent().unwrap_or(root))
}

use std::os::unix::fs::OpenOptionsExt;

use correu_runtime::sync::{create_private, create_private_dirs, lock, sync_dir};

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
        let state = Arc::new(State::default());
        let (r, st) = (root.clone(), state.clone());
        let (journal, owner) = tokio::task::spawn_blocking(move || {
            for d in ["tmp", "active", "deferred", "parked", "journal"] {
                create_private_dirs(&r.join(d))?;
            }
            // The directories' names are durable before anything in them is.
            sync_dir(&r)?;
            if !owner {
                return Ok((None, None));
            }
            let lock_file = std::fs::OpenOptions::new()
                .mode(0o600)
                .create(true)
                .truncate(false)
                .write(true)
                .open(r.join("lock"))?;
            if lock_file.try_lock().is_err() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("another process uses the spool at {}", r.display()),
                ));
            }
            for e in std::fs::read_dir(r.join("tmp"))? {
                std::fs::remove_file(e?.path())?;
            }
            // What was accepted and not settled before a stop or a crash
            // is handed out again, oldest first (ids sort by time).
            let replayed = journal::replay(&r.join("journal"))?;
            let mut waiting: Vec<_> = replayed
                .live
                .iter()
                .map(|(id, loc)| (id.clone(), *loc))
                .collect();
            waiting.sort_by(|a, b| a.0.cmp(&b.0));
            lock(&st.pending).extend(
                waiting
                    .into_iter()
                    .map(|(id, loc)| (id, Source::Journal(loc, None))),
            );
            let sink = st.clone();
            Journal::start(
                r.join("journal"),
                &replayed,
                Box::new(move |id, loc, data| sink.hand_on(id, loc, data)),
            )
            .map(|j| (Some(j), Some(lock_file)))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Spool {
            root,
            state,
            journal,
            _owner: owner,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn publish(&self, msg: &QueuedMessage) -> Result<(), PublishError> {
        if !is_queue_id(&msg.queue_id) {
            return Err(PublishError::BadQueueId(msg.queue_id.clone()));
        }
        let Some(journal) = &self.journal else {
            return Err(PublishError::ReadOnly);
        };
        journal
            .append(msg.queue_id.clone(), msg.encode_to_vec())
            .await?;
        Ok(())
    }

    /// Writes each event durably to `events/` ([`crate::events`]).
    pub async fn publish_events(
        &self,
        events: &[crate::events::Event],
    ) -> Result<(), PublishError> {
        if self.journal.is_none() {
            return Err(PublishError::ReadOnly);
        }
        let root = self.root.clone();
        let events = events.to_vec();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let dir = crate::events::spool_dir(&root);
            create_private_dirs(&dir)?;
            for e in &events {
                let name = crate::events::file_name(&e.id);
                let tmp = root.join("tmp").join(&name);
                let mut f = create_private(&tmp)?;
                f.write_all(&e.payload)?;
                f.sync_all()?;
                drop(f);
                std::fs::rename(&tmp, dir.join(&name))?;
            }
            sync_dir(&dir)
        })
        .await
        .map_err(|e| PublishError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// Moves due deferred messages back to `active/`, and lists up to a
    /// batch of active ids that are not in flight.
    fn scan(&self) -> std::io::Result<Vec<String>> {
        let now = now_millis();
        let inflight = lock(&self.state.inflight).clone();
        for e in std::fs::read_dir(self.root.join("deferred"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((due, id)) = name.split_once('-') else {
                continue;
            };
            // One in flight moves back once it is settled.
            if due.parse::<u128>().is_ok_and(|d| d <= now)
                && is_queue_id(id)
                && !inflight.contains(id)
            {
                self.move_to_active(&e.path(), id)?;
            }
        }
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

    /// Moves `from` to `active/ID` unless a file is already there (a
    /// message in flight keeps its file until it is settled, and a rename
    /// would replace it): link, then unlink. Whether it moved.
    fn move_to_active(&self, from: &Path, id: &str) -> std::io::Result<bool> {
        match std::fs::hard_link(from, self.root.join("active").join(id)) {
            Ok(()) => {
                std::fs::remove_file(from)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next message to hand out, marked in flight.
    fn take_pending(&self) -> Option<(String, Source)> {
        let mut pending = lock(&self.state.pending);
        let mut inflight = lock(&self.state.inflight);
        let mut busy = Vec::new();
        let mut found = None;
        while let Some((id, source)) = pending.pop_front() {
            if inflight.insert(id.clone()) {
                found = Some((id, source));
                break;
            }
            // The same id is in flight from elsewhere (its file in
            // `active/`): a file is found again by the next scan, but a
            // journal entry exists only here, so it waits its turn.
            if let Source::Journal(..) = source {
                busy.push((id, source));
            }
        }
        pending.extend(busy);
        if let Some((_, Source::Journal(_, Some(data)))) = &found {
            self.state.held.fetch_sub(data.len(), Ordering::Relaxed);
        }
        found
    }

    /// Whether `pending` holds files from a scan not yet handed out.
    fn files_pending(&self) -> bool {
        lock(&self.state.pending)
            .iter()
            .any(|(_, s)| matches!(s, Source::File))
    }

    fn settle(&self, id: &str) {
        lock(&self.state.settle_failures).remove(id);
        lock(&self.state.inflight).remove(id);
    }

    /// Takes a message handed out back, unsettled: a journal entry returns
    /// to the front of the queue, a file in `active/` to the next scan.
    fn give_back(&self, id: &str, journal: Option<Location>) {
        match journal {
            Some(loc) => {
                let mut pending = lock(&self.state.pending);
                lock(&self.state.inflight).remove(id);
                pending.push_front((id.to_string(), Source::Journal(loc, None)));
            }
            // A file is found again by the next scan.
            None => {
                lock(&self.state.inflight).remove(id);
            }
        }
        self.state.notify.notify_one();
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
        let journal = match &self.journal {
            Some(j) if j.stopped() => return Err(super::journal::stopped()),
            Some(j) => j.live(),
            None => journal::replay(&self.root.join("journal"))?.live.len(),
        };
        Ok(SpoolCounts {
            active: count("active", |n| n)? + journal,
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
            if is_queue_id(id) && which.matches(id) && self.move_to_active(&e.path(), id)? {
                n += 1;
            }
        }
        if n > 0 {
            sync_dir(&self.root.join("active"))?;
            self.state.notify.notify_one();
        }
        Ok(n)
    }

    /// Deletes a message wherever it waits (not one being delivered).
    pub fn delete(&self, id: &str) -> std::io::Result<usize> {
        if !is_queue_id(id) || lock(&self.state.inflight).contains(id) {
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

    /// The parked messages with their reasons; when each was parked is
    /// the time of its `.reason` file.
    pub fn parked(&self) -> std::io::Result<Vec<crate::admin::Parked>> {
        let dir = self.root.join("parked");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let id = e.file_name().to_string_lossy().into_owned();
            if !is_queue_id(&id) {
                continue;
            }
            // Requeued or deleted meanwhile: skip.
            let Ok(meta) = e.metadata() else { continue };
            let reason_file = dir.join(format!("{id}.reason"));
            let reason = std::fs::read_to_string(&reason_file).unwrap_or_default();
            let parked_at_unix_ms = std::fs::metadata(&reason_file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64);
            out.push(crate::admin::Parked {
                queue_id: id,
                reason: reason.trim_end().to_string(),
                bytes: meta.len(),
                parked_at_unix_ms,
            });
        }
        Ok(out)
    }

    /// Gives parked messages back to delivery.
    pub fn requeue_parked(&self, which: crate::admin::Which<'_>) -> std::io::Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(self.root.join("parked"))? {
            let e = e?;
            let id = e.file_name().to_string_lossy().into_owned();
            if is_queue_id(&id) && which.matches(&id) && self.move_to_active(&e.path(), &id)? {
                let _reason =
                    std::fs::remove_file(self.root.join("parked").join(format!("{id}.reason")));
                n += 1;
            }
        }
        if n > 0 {
            sync_dir(&self.root.join("active"))?;
            self.state.notify.notify_one();
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

impl State {
    /// A new message is durable: queue it for delivery, with its bytes while
    /// few enough are held.
    fn hand_on(&self, id: String, loc: Location, data: Vec<u8>) {
        let keep = self.held.load(Ordering::Relaxed) + data.len() <= HOLD_BYTES;
        let data = keep.then(|| {
            self.held.fetch_add(data.len(), Ordering::Relaxed);
            data
        });
        lock(&self.pending).push_back((id, Source::Journal(loc, data)));
        self.notify.notify_one();
    }
}

pub struct SpoolConsumer {
    spool: Arc<Spool>,
    last_scan: Option<Instant>,
}

impl SpoolConsumer {
    pub fn new(spool: Arc<Spool>) -> Self {
        SpoolConsumer {
            spool,
            last_scan: None,
        }
    }

    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            // `active/` and the due retries are looked at every IDLE_POLL
            // even while new messages keep coming.
            if self.last_scan.is_none_or(|t| t.elapsed() >= IDLE_POLL)
                && !self.spool.files_pending()
            {
                self.last_scan = Some(Instant::now());
                let spool = self.spool.clone();
                match tokio::task::spawn_blocking(move || spool.scan()).await {
                    Ok(Ok(ids)) => lock(&self.spool.state.pending)
                        .extend(ids.into_iter().map(|id| (id, Source::File))),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot scan the spool"),
                    Err(e) => tracing::error!(error = %e, "spool scan task failed"),
                }
            }
            if let Some((id, source)) = self.spool.take_pending() {
                let (raw, journal) = match source {
                    Source::Journal(loc, Some(data)) => (Ok(data), Some(loc)),
                    Source::Journal(loc, None) => {
                        let dir = self.spool.root.join("journal");
                        let read = tokio::task::spawn_blocking(move || journal::read(&dir, loc))
                            .await
                            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                        (read, Some(loc))
                    }
                    Source::File => {
                        let path = self.spool.root.join("active").join(&id);
                        (tokio::fs::read(&path).await, None)
                    }
                };
                match raw {
                    Ok(raw) => {
                        let message = QueuedMessage::decode(raw.as_slice()).ok();
                        return Some(Delivery {
                            message,
                            raw,
                            handle: Handle::Spool(SpoolHandle {
                                spool: self.spool.clone(),
                                id,
                                journal,
                            }),
                        });
                    }
                    // Settled by another consumer since the scan.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && journal.is_none() => {
                        self.spool.settle(&id);
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot read a spooled message; trying again");
                        // A file is found again by a scan; a journal entry
                        // goes back to the queue.
                        self.spool.give_back(&id, journal);
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(IDLE_POLL) => continue,
                        }
                    }
                }
            }
            // Nothing to hand out now (what is left, if anything, waits for
            // the same id in flight to be settled): wait for news or a scan.
            let due = IDLE_POLL.saturating_sub(self.last_scan.map_or(IDLE_POLL, |t| t.elapsed()));
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = self.spool.state.notify.notified() => {}
                _ = tokio::time::sleep(due) => {}
            }
        }
    }
}

pub(crate) struct SpoolHandle {
    spool: Arc<Spool>,
    id: String,
    /// Where it is in the journal, when it came from there.
    journal: Option<Location>,
}

impl SpoolHandle {
    fn active(&self) -> PathBuf {
        self.spool.root.join("active").join(&self.id)
    }

    /// Gives the message back, to be handed out again soon.
    pub(crate) fn release(self) {
        self.spool.give_back(&self.id, self.journal);
    }

    /// After a failure to settle: the message is handed out again, not at
    /// once, and later after each failure in a row (0.5 s, 1 s, 2 s … up to
    /// a minute): a failing disk must not make a hot loop.
    fn give_back_later(self) {
        let SpoolHandle { spool, id, journal } = self;
        let failures = {
            let mut f = lock(&spool.state.settle_failures);
            let n = f.entry(id.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let delay = settle_backoff(failures);
        tracing::warn!(queue_id = %id, failures, retry_in = ?delay, "cannot settle; the message is handed out again later");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            spool.give_back(&id, journal);
        });
    }

    pub(crate) async fn ack(self) -> Result<(), QueueError> {
        if let Some(loc) = self.journal {
            if let Some(j) = &self.spool.journal {
                j.settle(self.id.clone(), loc.seg);
            }
            self.spool.settle(&self.id);
            return Ok(());
        }
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
        self.settle_after(move || {
            let dest = root.join("deferred").join(format!("{due:015}-{id}"));
            write_durably(&root, &format!("{id}.retry"), &data, &dest)
        })
        .await
    }

    /// Runs `keep` (the message made durable in its next place) on the
    /// blocking pool, then settles this copy; if `keep` fails, the message
    /// is given back instead.
    async fn settle_after(
        self,
        keep: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), QueueError> {
        let kept = tokio::task::spawn_blocking(keep)
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match kept {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.give_back_later();
                Err(e.into())
            }
        }
    }

    pub(crate) async fn park(self, raw: &[u8], reason: &str) -> Result<(), QueueError> {
        let root = self.spool.root.clone();
        let id = self.id.clone();
        let reason = reason.to_string();
        // From the journal, the bytes are written out; from `active/`, the
        // file is moved.
        let data = self.journal.map(|_| raw.to_vec());
        self.settle_after(move || {
            let parked = root.join("parked");
            write_durably(
                &root,
                &format!("{id}.reason"),
                reason.as_bytes(),
                &parked.join(format!("{id}.reason")),
            )?;
            match data {
                Some(data) => write_durably(&root, &id, &data, &parked.join(&id)),
                None => {
                    std::fs::rename(root.join("active").join(&id), parked.join(&id))?;
                    sync_dir(&parked)
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_settle_is_tried_again_later_each_time() {
        let got: Vec<u64> = (1..=10)
            .map(|n| settle_backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
    }
}
