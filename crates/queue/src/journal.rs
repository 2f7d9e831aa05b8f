//! The spool's intake journal: how `correu serve` makes a new message
//! durable with a fraction of a disk flush.
//!
//! A message accepted by ingress is appended to the current segment file
//! of `journal/` by one writer thread. The thread takes every append that
//! arrived while it was busy, writes them with one `write`, flushes them
//! with one `fdatasync` (group commit) and only then answers each
//! publisher, so `250` still means "on disk". Sixteen sessions finishing
//! DATA at once cost one flush instead of sixteen file creations, sixteen
//! flushes and sixteen directory flushes.
//!
//! When delivery settles a message (delivered, deferred into its own file
//! under `deferred/`, or parked), a settle record is appended, unflushed: if
//! it is lost in a crash the message is delivered again, and delivery is
//! idempotent. A segment file is removed once every message in it, and in
//! every older segment, is settled (in order, so that no settle record is
//! lost before the message it settles); the journal therefore holds what is
//! waiting or in flight plus what was settled since the oldest of those.
//!
//! Record: magic (u32 LE), kind (u8), payload length (u32 LE), CRC-32 of
//! kind and payload (u32 LE), payload. An append's payload is the id's
//! length (u8), the id, then the `QueuedMessage` bytes; a settle's is the
//! id. Reading stops at the first record that is short or fails its check:
//! only the tail written after the last flush can be torn, and nothing in
//! it was acknowledged. After a restart appends go to a new segment, never
//! after a possibly torn tail.

use correu_runtime::sync::{lock, sync_dir};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

const MAGIC: u32 = 0x436a_6e31;
const APPEND: u8 = 1;
const SETTLE: u8 = 2;
const HEADER: usize = 13;
/// A segment takes no more appends past this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Most bytes written (and flushed) in one batch.
const BATCH_BYTES: usize = 8 << 20;

/// Where a message's bytes are in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub seg: u64,
    /// Of the `QueuedMessage` bytes, past the header and the id.
    pub offset: u64,
    pub len: u32,
}

fn segment_name(seg: u64) -> String {
    format!("{seg:016}.log")
}

fn segment_of(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

fn checksum(kind: u8, payload: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    for p in payload {
        h.update(p);
    }
    h.finalize()
}

/// A record's header: magic, kind, payload length, checksum.
fn put_header(buf: &mut Vec<u8>, kind: u8, payload: &[&[u8]]) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.push(kind);
    // Messages are bounded far below 4 GiB by smtp.max_message_size.
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&checksum(kind, payload).to_le_bytes());
}

/// Message bytes past this size are written from where they are rather
/// than copied into the batch.
const INLINE: usize = 64 << 10;

/// Part of a batch: bytes in the batch's own buffer, or a message's.
enum Piece<'a> {
    Own(std::ops::Range<usize>),
    Message(&'a [u8]),
}

/// `write_all` over several slices, at most `IOV_MAX` (1,024) per call.
fn write_all_slices(f: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let n = slices.len().min(1024);
        match f.write_vectored(&slices[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut segs = Vec::new();
    for e in std::fs::read_dir(dir)? {
        if let Some(seg) = segment_of(&e?.file_name().to_string_lossy()) {
            segs.push(seg);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

/// What the journal holds: the messages not settled, and every segment.
pub(crate) struct Replayed {
    pub live: HashMap<String, Location>,
    pub segments: Vec<u64>,
}

/// Reads every segment: the messages appended and not settled.
pub(crate) fn replay(dir: &Path) -> io::Result<Replayed> {
    let segments = segments(dir)?;
    let mut live = HashMap::new();
    for &seg in &segments {
        let file = match File::open(dir.join(segment_name(seg))) {
            Ok(f) => f,
            // Removed since the listing (the admin command reads a running
            // server's journal): everything in it was settled.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut offset = 0u64;
        let mut header = [0u8; HEADER];
        loop {
            if r.read_exact(&mut header).is_err() {
                break;
            }
            let word = |i: usize| {
                u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            let (magic, kind, len, crc) = (word(0), header[4], word(5), word(9));
            // A length past the end of the file is a torn tail, not a
            // reason to allocate it.
            if magic != MAGIC || offset + (HEADER as u64) + u64::from(len) > size {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if r.read_exact(&mut payload).is_err() || checksum(kind, &[&payload]) != crc {
                break;
            }
            match kind {
                APPEND => {
                    let id_len = payload.first().copied().unwrap_or(0) as usize;
                    let Some(id) = payload.get(1..1 + id_len) else {
                        break;
                    };
                    let id = String::from_utf8_lossy(id).into_owned();
                    let at = offset + HEADER as u64 + 1 + id_len as u64;
                    let len = (payload.len() - 1 - id_len) as u32;
                    live.insert(
                        id,
                        Location {
                            seg,
                            offset: at,
                            len,
                        },
                    );
                }
                SETTLE => {
                    live.remove(String::from_utf8_lossy(&payload).as_ref());
                }
                _ => break,
            }
            offset += (HEADER + payload.len()) as u64;
        }
    }
    Ok(Replayed { live, segments })
}

/// Reads one message's bytes back from its segment.
pub(crate) fn read(dir: &Path, loc: Location) -> io::Result<Vec<u8>> {
    let mut f = File::open(dir.join(segment_name(loc.seg)))?;
    f.seek(SeekFrom::Start(loc.offset))?;
    let mut data = vec![0u8; loc.len as usize];
    f.read_exact(&mut data)?;
    Ok(data)
}

/// A message made durable, handed to whoever takes new messages.
pub(crate) type Sink = Box<dyn Fn(String, Location, Vec<u8>) + Send>;

enum Op {
    Append {
        id: String,
        data: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
    Settle {
        id: String,
        seg: u64,
    },
}

/// The writer thread's handle. Dropping it lets the thread finish what was
/// sent and stop.
pub(crate) struct Journal {
    tx: Option<mpsc::Sender<Op>>,
    /// Settles wait here for the writer's next batch (or its idle tick):
    /// they need no flush, so they never wake it.
    settles: Arc<Mutex<Vec<Op>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    live: Arc<AtomicUsize>,
}

impl Drop for Journal {
    /// Waits for the writer to finish what was sent (one batch at most).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _panicked = w.join();
        }
    }
}

pub(crate) fn stopped() -> io::Error {
    io::Error::other("the spool journal writer has stopped")
}

impl Journal {
    /// Starts the writer on `dir` after a [`replay`]: appends go to a new
    /// segment; `sink` gets each message once it is durable.
    pub(crate) fn start(dir: PathBuf, replayed: &Replayed, sink: Sink) -> io::Result<Journal> {
        let mut live_per_segment: BTreeMap<u64, usize> =
            replayed.segments.iter().map(|&s| (s, 0)).collect();
        for loc in replayed.live.values() {
            *live_per_segment.entry(loc.seg).or_insert(0) += 1;
        }
        let live = Arc::new(AtomicUsize::new(replayed.live.len()));
        let settles = Arc::new(Mutex::new(Vec::new()));
        let next = replayed.segments.last().map_or(1, |s| s + 1);
        let mut writer = Writer {
            dir,
            seg: next,
            next_seg: next,
            file: None,
            offset: 0,
            live_per_segment,
            live: live.clone(),
            settles: settles.clone(),
            sink,
        };
        writer.rotate()?;
        writer.collect();
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("correu-journal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Journal {
            tx: Some(tx),
            settles,
            writer: Some(writer),
            live,
        })
    }

    /// Appends a message; returns once it is flushed to disk.
    pub(crate) async fn append(&self, id: String, data: Vec<u8>) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(Op::Append { id, data, done })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Records that a message is settled (not flushed on its own).
    pub(crate) fn settle(&self, id: String, seg: u64) {
        // A stopped writer means the process is stopping: the message is
        // simply handed out again after the restart.
        lock(&self.settles).push(Op::Settle { id, seg });
    }

    /// Whether the writer thread is gone (it only stops when dropped, or
    /// on a bug): then every publish fails and readiness says so.
    pub(crate) fn stopped(&self) -> bool {
        self.writer.as_ref().is_none_or(|w| w.is_finished())
    }

    /// Messages in the journal not yet settled.
    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

struct Writer {
    dir: PathBuf,
    /// The segment appends go to, and the number the next one takes.
    seg: u64,
    next_seg: u64,
    file: Option<File>,
    offset: u64,
    /// Unsettled messages per segment, every segment on disk included.
    live_per_segment: BTreeMap<u64, usize>,
    live: Arc<AtomicUsize>,
    settles: Arc<Mutex<Vec<Op>>>,
    sink: Sink,
}

/// How often an idle writer writes the settles that came meanwhile.
const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let mut ops = match rx.recv_timeout(IDLE_TICK) {
                Ok(op) => vec![op],
                Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let last = std::mem::take(&mut *lock(&self.settles));
                    if !last.is_empty() {
                        self.commit(last);
                    }
                    return;
                }
            };
            ops.append(&mut lock(&self.settles));
            if ops.is_empty() {
                continue;
            }
            let mut bytes = 0;
            while bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { data, .. } = &op {
                            bytes += data.len();
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(ops);
        }
    }

    /// Writes one batch: one write, one flush when it holds appends.
    fn commit(&mut self, ops: Vec<Op>) {
        if self.file.is_none()
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "cannot open a spool journal segment");
        }
        // Headers, ids, settles and small messages are copied into one
        // buffer; large messages are written from where they are.
        let mut own = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut locations = Vec::new();
        let mut end = self.offset;
        let push_own = |pieces: &mut Vec<Piece>, r: std::ops::Range<usize>| match pieces.last_mut()
        {
            Some(Piece::Own(last)) if last.end == r.start => last.end = r.end,
            _ => pieces.push(Piece::Own(r)),
        };
        for op in &ops {
            let start = own.len();
            match op {
                Op::Append { id, data, .. } => {
                    let id_len = [id.len() as u8];
                    put_header(&mut own, APPEND, &[&id_len, id.as_bytes(), data]);
                    own.extend_from_slice(&id_len);
                    own.extend_from_slice(id.as_bytes());
                    let at = end + (own.len() - start) as u64;
                    locations.push(Location {
                        seg: self.seg,
                        offset: at,
                        len: data.len() as u32,
                    });
                    if data.len() > INLINE {
                        push_own(&mut pieces, start..own.len());
                        pieces.push(Piece::Message(data));
                    } else {
                        own.extend_from_slice(data);
                        push_own(&mut pieces, start..own.len());
                    }
                    end = at + data.len() as u64;
                }
                Op::Settle { id, .. } => {
                    put_header(&mut own, SETTLE, &[id.as_bytes()]);
                    own.extend_from_slice(id.as_bytes());
                    push_own(&mut pieces, start..own.len());
                    end += (own.len() - start) as u64;
                }
            }
        }
        let mut slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .map(|p| match p {
                Piece::Own(r) => IoSlice::new(&own[r.clone()]),
                Piece::Message(data) => IoSlice::new(data),
            })
            .collect();
        let appends = locations.len();
        let written = match self.file.as_mut() {
            Some(f) => write_all_slices(f, &mut slices)
                .and_then(|()| if appends > 0 { f.sync_data() } else { Ok(()) }),
            None => Err(io::Error::other("no spool journal segment is open")),
        };
        drop(slices);
        drop(pieces);
        let failed = written.as_ref().err().map(|e| (e.kind(), e.to_string()));
        if failed.is_none() {
            self.offset = end;
            *self.live_per_segment.entry(self.seg).or_insert(0) += appends;
            self.live.fetch_add(appends, Ordering::Relaxed);
        }
        for op in &ops {
            if let Op::Settle { seg, .. } = op
                && let Some(n) = self.live_per_segment.get_mut(seg)
                && *n > 0
            {
                *n -= 1;
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some((_, msg)) = &failed {
            // What follows the failed write in this file is unknown: cut it
            // off (its clients were told 451, so it must not come back at a
            // restart). Once cut, the segment goes on from there (appends
            // write at its end); only one that cannot be cut is left for a
            // new one, so a full disk makes no file per failed batch.
            let cut = self.file.as_ref().map(|f| f.set_len(self.offset));
            tracing::error!(error = %msg, "spool journal write failed; the clients were told 451");
            if !matches!(cut, Some(Ok(()))) {
                if let Some(Err(e)) = cut {
                    tracing::error!(error = %e, "cannot cut the failed write off its segment; starting another");
                }
                if let Err(e) = self.rotate() {
                    tracing::error!(error = %e, "cannot open a spool journal segment");
                }
            }
        } else if self.offset >= SEGMENT_BYTES
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "cannot open a spool journal segment");
        }
        self.collect();
        let mut locations = locations.into_iter();
        for op in ops {
            let Op::Append { id, data, done } = op else {
                continue;
            };
            let reply = match (&failed, locations.next()) {
                (None, Some(loc)) => {
                    // Handed on before the publisher hears of it: a
                    // publisher that went away leaves nothing behind.
                    (self.sink)(id, loc, data);
                    Ok(())
                }
                (Some((kind, msg)), _) => Err(io::Error::new(*kind, msg.clone())),
                (None, None) => Err(io::Error::other("journal bookkeeping")),
            };
            let _gone = done.send(reply);
        }
    }

    /// Opens the next segment; its name is flushed to the directory before
    /// anything in it is acknowledged. Never appends to an existing file.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        loop {
            let seg = self.next_seg;
            self.next_seg += 1;
            let path = self.dir.join(segment_name(seg));
            match OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    self.live_per_segment.entry(seg).or_insert(0);
                    sync_dir(&self.dir)?;
                    self.seg = seg;
                    self.file = Some(file);
                    self.offset = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the oldest segments while every message in them is settled.
    fn collect(&mut self) {
        while let Some((&seg, &n)) = self.live_per_segment.first_key_value() {
            if n > 0 || seg == self.seg {
                break;
            }
            match std::fs::remove_file(self.dir.join(segment_name(seg))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, segment = seg, "cannot remove a settled journal segment");
                    break;
                }
            }
            self.live_per_segment.remove(&seg);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    type Got = Arc<Mutex<Vec<(String, Location, Vec<u8>)>>>;

    fn start(dir: &Path) -> (Journal, Got) {
        let got: Got = Arc::default();
        let g = got.clone();
        let replayed = replay(dir).unwrap();
        let j = Journal::start(
            dir.to_path_buf(),
            &replayed,
            Box::new(move |id, loc, data| g.lock().unwrap().push((id, loc, data))),
        )
        .unwrap();
        (j, got)
    }

    #[tokio::test]
    async fn appended_messages_survive_a_restart_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let (j, got) = start(dir.path());
        for i in 0..5 {
            j.append(format!("ID{i}"), vec![i as u8; 100 + i])
                .await
                .unwrap();
        }
        let handed: Vec<_> = got.lock().unwrap().clone();
        assert_eq!(handed.len(), 5);
        for (id, loc, data) in &handed {
            assert_eq!(&read(dir.path(), *loc).unwrap(), data, "{id}");
        }
        assert_eq!(j.live(), 5);
        j.settle("ID1".into(), handed[1].1.seg);
        j.settle("ID3".into(), handed[3].1.seg);
        // The writer finishes what was sent before it stops.
        drop(j);
        let r = replay(dir.path()).unwrap();
        let mut left: Vec<_> = r.live.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["ID0", "ID2", "ID4"]);
        assert_eq!(read(dir.path(), r.live["ID4"]).unwrap(), vec![4u8; 104]);
    }

    #[tokio::test]
    async fn large_and_small_messages_in_one_batch_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (j, got) = start(dir.path());
        let j = Arc::new(j);
        let sizes = [10, INLINE + 1, 3, 5 << 20, INLINE, 7];
        let appends: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let j = j.clone();
                tokio::spawn(async move { j.append(format!("M{i}"), vec![i as u8 + 1; n]).await })
            })
            .collect();
        for a in appends {
            a.await.unwrap().unwrap();
        }
        for (id, loc, data) in got.lock().unwrap().iter() {
            assert_eq!(&read(dir.path(), *loc).unwrap(), data, "{id}");
        }
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.live.len(), sizes.len());
        for (i, &n) in sizes.iter().enumerate() {
            let back = read(dir.path(), r.live[&format!("M{i}")]).unwrap();
            assert_eq!(back, vec![i as u8 + 1; n]);
        }
    }

    #[tokio::test]
    async fn a_torn_tail_is_ignored_and_appends_go_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (j, got) = start(dir.path());
        j.append("A".into(), b"first".to_vec()).await.unwrap();
        j.append("B".into(), b"second".to_vec()).await.unwrap();
        drop(j);
        let seg = got.lock().unwrap()[0].1.seg;
        let path = dir.path().join(segment_name(seg));
        let len = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of the last write.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (j, _) = start(dir.path());
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.live.keys().collect::<Vec<_>>(), ["A"]);
        assert_eq!(
            r.segments.len(),
            2,
            "the torn segment is kept, a new one opened"
        );
        j.append("C".into(), b"third".to_vec()).await.unwrap();
        assert_eq!(replay(dir.path()).unwrap().live.len(), 2);
    }

    #[tokio::test]
    async fn a_tail_claiming_a_huge_record_is_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let (j, got) = start(dir.path());
        j.append("A".into(), b"first".to_vec()).await.unwrap();
        drop(j);
        let seg = got.lock().unwrap()[0].1.seg;
        // Half a header that passes the magic check and claims 4 GiB.
        let mut tail = MAGIC.to_le_bytes().to_vec();
        tail.push(APPEND);
        tail.extend_from_slice(&u32::MAX.to_le_bytes());
        tail.extend_from_slice(&[0; 4]);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(segment_name(seg)))
            .unwrap();
        f.write_all(&tail).unwrap();
        let r = replay(dir.path()).unwrap();
        assert_eq!(r.live.keys().collect::<Vec<_>>(), ["A"]);
    }

    #[tokio::test]
    async fn settled_segments_are_removed_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (j, got) = start(dir.path());
        j.append("A".into(), vec![1; 10]).await.unwrap();
        drop(j);
        // Restarted: A is still live in segment 1, appends go to segment 2.
        let (j, got2) = start(dir.path());
        j.append("B".into(), vec![2; 10]).await.unwrap();
        let seg_b = got2.lock().unwrap()[0].1.seg;
        let seg_a = got.lock().unwrap()[0].1.seg;
        assert!(seg_b > seg_a);
        drop(j);
        // Restarted again (segment 3 current): B settled first keeps both
        // older segments, since A in the oldest is still live.
        let (j, _) = start(dir.path());
        j.settle("B".into(), seg_b);
        j.append("C".into(), vec![3; 10]).await.unwrap();
        assert!(dir.path().join(segment_name(seg_b)).exists());
        j.settle("A".into(), seg_a);
        j.append("D".into(), vec![4; 10]).await.unwrap();
        assert!(!dir.path().join(segment_name(seg_a)).exists());
        assert!(!dir.path().join(segment_name(seg_b)).exists());
        let mut left: Vec<_> = replay(dir.path()).unwrap().live.into_keys().collect();
        left.sort();
        assert_eq!(left, ["C", "D"]);
    }
}
