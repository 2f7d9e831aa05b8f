//! `correu bench`: an SMTP load generator, for Correu or any server.
//!
//! N clients send M messages in all, each over its own connection or K to
//! a connection, pipelined when the server offers PIPELINING (unless told
//! not to), as fast as possible or at a target rate. It reports messages
//! per second, the latency from the end of DATA to the `250`
//! (p50/p99/p99.9), errors by reply code, and, with `--watch DIR` (a
//! Maildir's `new/`), the time from `250` to the message being stored.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub server: SocketAddr,
    /// Clients sending at once.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Messages per connection (1: a connection per message, as MX traffic).
    #[arg(long, default_value_t = 1)]
    pub per_connection: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Never pipeline, even when the server offers PIPELINING.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Messages per second in all (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, default_value = "bench@example.com")]
    pub from: String,
    #[arg(long, default_value = "pere@localhost")]
    pub to: String,
    /// Send this message (a file, CRLF or LF lines) instead of a made-up
    /// one of `--size` (a DKIM-signed message, to measure verification).
    #[arg(long)]
    pub message: Option<PathBuf>,
    /// A Maildir `new/` to watch: reports the time from `250` to stored.
    #[arg(long)]
    pub watch: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Tally {
    /// DATA-end → reply, for 250s.
    latencies: Vec<Duration>,
    /// Queue id (from `250 … queued as ID`) → when the 250 came.
    accepted: HashMap<String, Instant>,
    errors: BTreeMap<String, usize>,
}

/// A server that says nothing for this long has failed the message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn reply(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<String> {
    tokio::time::timeout(REPLY_TIMEOUT, read_reply(r))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn read_reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let last = line.as_bytes().get(3) != Some(&b'-');
        all.push_str(&line);
        if last {
            return Ok(all);
        }
    }
}

pub(crate) fn code(r: &str) -> &str {
    r.get(..3).unwrap_or("???")
}

/// One connection: greeting, EHLO, then `count` messages.
async fn connection(
    a: &BenchArgs,
    body: &[u8],
    count: usize,
    pace: &Pace,
    tally: &Mutex<Tally>,
) -> std::io::Result<()> {
    let stream = tokio::time::timeout(REPLY_TIMEOUT, TcpStream::connect(a.server))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let fail = |what: String| {
        let mut t = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t.errors.entry(what).or_default() += 1;
    };
    let greeting = reply(&mut rd).await?;
    if code(&greeting) != "220" {
        fail(format!("greeting {}", code(&greeting)));
        return Ok(());
    }
    wr.write_all(b"EHLO bench.example\r\n").await?;
    let ehlo = reply(&mut rd).await?;
    let pipelining = !a.no_pipelining && ehlo.to_ascii_uppercase().contains("PIPELINING");
    let envelope = format!("MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n", a.from, a.to);
    for _ in 0..count {
        pace.wait().await;
        let (mail, rcpt, data) = if pipelining {
            wr.write_all(envelope.as_bytes()).await?;
            (
                reply(&mut rd).await?,
                reply(&mut rd).await?,
                reply(&mut rd).await?,
            )
        } else {
            let mut out = Vec::new();
            for cmd in envelope.split_inclusive("\r\n") {
                wr.write_all(cmd.as_bytes()).await?;
                out.push(reply(&mut rd).await?);
            }
            (out.remove(0), out.remove(0), out.remove(0))
        };
        if code(&data) != "354" {
            fail(format!(
                "MAIL {} RCPT {} DATA {}",
                code(&mail),
                code(&rcpt),
                code(&data)
            ));
            wr.write_all(b"RSET\r\n").await?;
            reply(&mut rd).await?;
            continue;
        }
        wr.write_all(body).await?;
        let sent = Instant::now();
        let end = reply(&mut rd).await?;
        let took = sent.elapsed();
        if code(&end) == "250" {
            let id = end
                .split("queued as ")
                .nth(1)
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let mut t = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.latencies.push(took);
            t.accepted.insert(id, Instant::now());
        } else {
            fail(format!("end of data {}", code(&end)));
        }
    }
    wr.write_all(b"QUIT\r\n").await?;
    let _ = reply(&mut rd).await;
    Ok(())
}

/// A shared pace: at most `rate` messages a second in all.
struct Pace {
    every: Option<Duration>,
    next: tokio::sync::Mutex<Instant>,
}

impl Pace {
    async fn wait(&self) {
        let Some(every) = self.every else { return };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + every;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: bench@example.com\r\nTo: pere@localhost\r\nSubject: correu bench\r\n\r\n".to_vec();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    while m.len() + line.len() + 3 <= size {
        m.extend_from_slice(line);
    }
    while m.len() + 5 < size {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n.\r\n");
    m
}

/// A message from a file as DATA sends it: CRLF line ends, dot-stuffed,
/// and the ending dot.
fn given_message(text: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(text.len() + 16);
    for line in text.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            m.push(b'.');
        }
        m.extend_from_slice(line);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

/// When each queue id first appeared in a watched Maildir `new/`.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Watches a Maildir `new/` and notes when each queue id first appears,
/// from inotify events (a directory listing every few milliseconds would
/// cost the machine more than the server being measured once it holds
/// thousands of files).
fn watch(
    dir: PathBuf,
    seen: Seen,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use rustix::fs::inotify;
    // A mailbox's first message makes its directories; watch from before.
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot make {}: {e}", dir.display()))?;
    let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
    inotify::add_watch(
        &fd,
        &dir,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
    )
    .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    let note = move |name: &str, at: Instant| {
        // TIME.QUEUEID_HASH.HOST,S=SIZE
        if let Some(id) = name.split('.').nth(1).and_then(|u| u.split('_').next()) {
            let mut seen = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.entry(id.to_string()).or_insert(at);
        }
    };
    Ok(std::thread::spawn(move || {
        let mut buf = [std::mem::MaybeUninit::uninit(); 64 << 10];
        let mut events = inotify::Reader::new(&fd, &mut buf);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match events.next() {
                Ok(e) => {
                    let now = Instant::now();
                    if e.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                        // Events were lost: look at the directory itself.
                        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                            note(&entry.file_name().to_string_lossy(), now);
                        }
                    } else if let Some(name) = e.file_name() {
                        note(&name.to_string_lossy(), now);
                    }
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }))
}

pub async fn run(
    a: BenchArgs,
    interrupt: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let body = Arc::new(match &a.message {
        Some(path) => given_message(
            &std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {} (--message): {e}", path.display()))?,
        ),
        None => message(a.size),
    });
    let tally = Arc::new(Mutex::new(Tally::default()));
    let pace = Arc::new(Pace {
        every: (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate)),
        next: tokio::sync::Mutex::new(Instant::now()),
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let watcher = match a.watch.clone() {
        Some(d) => Some(watch(d, seen.clone(), stop.clone())?),
        None => None,
    };
    let per = a.per_connection.max(1);
    let connections = a.messages.div_ceil(per);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.clients.max(1) {
        let (a, body, tally, pace, next) = (
            a.clone(),
            body.clone(),
            tally.clone(),
            pace.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= connections {
                    return;
                }
                let count = per.min(a.messages - n * per);
                if let Err(e) = connection(&a, &body, count, &pace, &tally).await {
                    let mut t = tally
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *t.errors
                        .entry(format!("connection: {}", e.kind()))
                        .or_default() += 1;
                }
            }
        });
    }
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = interrupt.cancelled() => {
                // Ctrl-C or SIGTERM: report what was done so far.
                tasks.abort_all();
                break;
            }
        }
    }
    let took = started.elapsed();
    let mut t = std::mem::take(
        &mut *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    t.latencies.sort();
    let ok = t.latencies.len();
    let mut e2e: Vec<Duration> = Vec::new();
    // Accepted and stored, per second, from the start to the last one stored.
    let mut stored_rate = 0.0;
    if let Some(w) = watcher {
        // Give the last messages time to land (files from earlier runs in
        // the same directory do not count).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let landed = {
                let seen = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.accepted
                    .iter()
                    .filter(|(id, _)| seen.contains_key(id.as_str()))
                    .count()
            };
            if landed >= t.accepted.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _watcher = w.join();
        let seen = std::mem::take(
            &mut *seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut last = started;
        for (id, at) in &t.accepted {
            if let Some(s) = seen.get(id) {
                e2e.push(s.saturating_duration_since(*at));
                last = last.max(*s);
            }
        }
        e2e.sort();
        stored_rate = e2e.len() as f64 / last.duration_since(started).as_secs_f64().max(1e-9);
    }
    let rate = ok as f64 / took.as_secs_f64();
    if a.json {
        let errors: Vec<String> = t
            .errors
            .iter()
            .map(|(k, v)| format!("{k:?}: {v}"))
            .collect();
        println!(
            "{{\"messages\": {ok}, \"seconds\": {:.3}, \"per_second\": {rate:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"stored\": {}, \"stored_per_second\": {stored_rate:.1}, \"e2e_p50_ms\": {:.3}, \"e2e_p99_ms\": {:.3}, \"errors\": {{{}}}}}",
            took.as_secs_f64(),
            pct(&t.latencies, 0.5),
            pct(&t.latencies, 0.99),
            pct(&t.latencies, 0.999),
            e2e.len(),
            pct(&e2e, 0.5),
            pct(&e2e, 0.99),
            errors.join(", ")
        );
    } else {
        println!(
            "{ok} messages of {} bytes in {:.2} s: {rate:.0} messages/s ({} clients, {} per connection)",
            a.size,
            took.as_secs_f64(),
            a.clients,
            per
        );
        println!(
            "DATA end → 250: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            pct(&t.latencies, 0.5),
            pct(&t.latencies, 0.99),
            pct(&t.latencies, 0.999)
        );
        if a.watch.is_some() {
            println!(
                "250 → stored: {} seen, p50 {:.2} ms, p99 {:.2} ms; accepted and stored: {stored_rate:.0} messages/s",
                e2e.len(),
                pct(&e2e, 0.5),
                pct(&e2e, 0.99)
            );
        }
        for (k, v) in &t.errors {
            println!("error: {k}: {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_message_is_sent_with_crlf_stuffed_and_ended() {
        assert_eq!(
            given_message(b"Subject: x\n\n.hidden\r\nlast"),
            b"Subject: x\r\n\r\n..hidden\r\nlast\r\n.\r\n".to_vec()
        );
    }

    #[test]
    fn messages_have_the_size_asked_and_end_with_the_dot() {
        for size in [512, 4096, 100 * 1024] {
            let m = message(size);
            assert_eq!(m.len(), size, "{size}");
            assert!(m.ends_with(b"\r\n.\r\n"));
            // No line starts with a dot: nothing to stuff.
            assert!(!m.windows(3).any(|w| w == b"\n.x"));
        }
    }

    #[test]
    fn percentiles() {
        let d: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        assert_eq!(pct(&d, 0.5), 500.0);
        assert_eq!(pct(&d, 0.99), 990.0);
        assert_eq!(pct(&d, 0.999), 999.0);
        assert_eq!(pct(&[], 0.5), 0.0);
    }
}
