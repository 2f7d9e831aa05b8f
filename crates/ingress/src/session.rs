//! The SMTP session driver: reads bytes, runs [`correu_smtp::session::Session`],
//! writes replies, and does what the session asks of the world: recipient
//! and credential checks, TLS, reading DATA and BDAT, queuing.
//!
//! Generic over the stream, so tests drive it in memory; replies to
//! pipelined commands are gathered and written together just before the
//! driver waits for more input (RFC 2920), so a multi-line reply is one
//! write.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_proto::v1::check_recipient_response::Status as RcptStatus;
use correu_proto::v1::{CheckRecipientRequest, QueuedMessage, Recipient};
use correu_smtp::command::Ret;
use correu_smtp::data::{DataReceiver, Progress};
use correu_smtp::headers::received_count;
use correu_smtp::session::{
    BodyReport, Chunked, CredentialVerdict, Envelope, Forward, Line, LineReader, Policy,
    QueueFailure, RecipientVerdict, Role, Session, Step,
};
use correu_smtp::{Address, Reply};
use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use crate::tls::{MaybeTls, describe};
use crate::{Shared, inbound};
use correu_smtp::proxy::{self, Header};

/// Bytes read at a time while a message comes in.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes read at a time while waiting for commands (a line is 512 at
/// most; pipelined ones come in several reads). An idle session holds
/// this, not a message-sized buffer: thousands of idle connections would
/// otherwise keep 16 KiB each, and leave the heap fragmented when they go.
const COMMAND_CHUNK: usize = 1024;

/// How a session ended, for logs.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Quit,
    ClientClosed,
    Timeout,
    Shutdown,
    /// Closed by the session: too many errors, messages, or a bad sequence.
    Closed,
    /// Refused before the greeting: a limit or a bad PROXY header.
    Refused,
    /// Idle while every slot was taken: closed for a new client.
    Evicted,
}

struct Conn<S> {
    stream: MaybeTls<S>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

/// What a read found.
enum Read {
    Data,
    Closed,
    TimedOut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads more bytes within `wait`.
    async fn fill(&mut self, wait: Duration) -> std::io::Result<Read> {
        self.fill_by(wait, READ_CHUNK).await
    }

    /// Reads what there is (at most `chunk` more octets of room).
    async fn fill_by(&mut self, wait: Duration, chunk: usize) -> std::io::Result<Read> {
        self.rbuf.reserve(chunk);
        match timeout(wait, self.stream.read_buf(&mut self.rbuf)).await {
            Err(_) => Ok(Read::TimedOut),
            Ok(Ok(0)) => Ok(Read::Closed),
            Ok(Ok(_)) => Ok(Read::Data),
            Ok(Err(e)) => Err(e),
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }

    /// Resolves if the client closes the connection (or it breaks) while
    /// the server works on its message, so a message whose answer nobody
    /// will read can be withdrawn. What the client sends meanwhile
    /// (pipelined commands) is kept, up to a few kilobytes.
    async fn gone(&mut self) {
        loop {
            if self.rbuf.len() >= 4 * COMMAND_CHUNK {
                return std::future::pending().await;
            }
            self.rbuf.reserve(COMMAND_CHUNK);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// After a message: the read buffer goes back to command size (a
    /// session that sent one large message does not keep its buffer).
    fn shrink(&mut self) {
        self.rbuf.shrink_to(COMMAND_CHUNK.max(self.rbuf.len()));
    }

    async fn say_and_end(&mut self, r: &Reply, end: End) -> std::io::Result<End> {
        self.reply(r);
        self.flush().await?;
        Ok(end)
    }
}

/// Runs one session to its end. `peer` is the TCP peer; when it is a
/// configured proxy, the client's address comes from the PROXY header.
pub async fn run_session<S>(
    shared: &Shared,
    stream: S,
    peer: SocketAddr,
    role: Role,
) -> std::io::Result<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let deadline = started + shared.max_session_time;
    // Idle (giving way to new clients when slots run out) from the start:
    // a connection that has not finished its PROXY header or handshake has
    // not said anything either.
    let idle = shared.sessions.register();
    let mut conn = Conn {
        stream: MaybeTls::Plain(stream),
        rbuf: Vec::new(),
        wbuf: Vec::new(),
    };
    let client = if shared.proxies.iter().any(|n| n.contains(peer.ip())) {
        let header = tokio::select! {
            h = read_proxy_header(shared, &mut conn) => h?,
            _ = idle.evicted() => return Ok(End::Evicted),
        };
        match header {
            Some(Header::Proxied(addr)) => addr,
            Some(Header::Local) => peer,
            None => return Ok(End::Refused),
        }
    } else {
        peer
    };
    let trusted = shared.trusted.iter().any(|n| n.contains(client.ip()));
    // Limits apply to the real client, and never to trusted networks
    // (Postfix's anvil exceptions). Each connection counts toward the
    // client's rate before anything else, a TLS handshake included, so
    // handshakes that never finish use it up too.
    let mut refusal = None;
    let _slot = if trusted {
        None
    } else {
        let probe = Session::new(shared.session.clone(), Policy::mx(false));
        let slot = shared.per_client.enter(client.ip());
        if slot.is_none() {
            refusal = Some((
                probe.rate_limited("connections from your address"),
                "client_limit",
            ));
        } else if !shared
            .rates
            .allow("conn", &client.ip().to_string(), shared.connection_rate)
            .await
        {
            refusal = Some((probe.rate_limited("connections"), "client_rate"));
        }
        slot
    };
    // On the implicit-TLS port the refusal is said inside TLS, as
    // everything there is (a plain-text line would be read as a broken
    // handshake).
    if role == Role::Submissions {
        let tls = tokio::select! {
            c = start_tls(shared, conn) => c?,
            _ = idle.evicted() => return Ok(End::Evicted),
        };
        conn = match tls {
            Some(c) => c,
            None => return Ok(End::Closed),
        };
    }
    // A client listed in the DNS blocklists is turned away before the
    // greeting, on the MX port only: submission clients authenticate.
    if refusal.is_none()
        && role == Role::Mx
        && !trusted
        && let Some(lists) = &shared.blocklists
        && let Some((reply, listed)) = lists.client(client.ip()).await
    {
        let zones: Vec<String> = listed
            .iter()
            .map(|l| format!("{}={}", l.zone, l.answer))
            .collect();
        tracing::warn!(client = %client, lists = %zones.join(" "), "client listed in DNS blocklists: refused");
        refusal = Some((reply, "blocklist"));
    }
    if let Some((reply, reason)) = refusal {
        refused(reason);
        return conn.say_and_end(&reply, End::Refused).await;
    }
    let tls_desc = match &conn.stream {
        MaybeTls::Tls(s) => Some(describe(s)),
        MaybeTls::Plain(_) => None,
    };
    let policy = Policy {
        role,
        tls_available: shared.tls.is_some(),
        tls_active: tls_desc.is_some(),
        auth_available: shared.auth.is_some() && role != Role::Mx,
        relay_allowed: trusted,
    };
    let mut session = Session::new(shared.session.clone(), policy);
    if let Some(d) = tls_desc {
        session.tls_started(d);
    }
    if shared.shutdown.is_cancelled() {
        refused("shutting_down");
        return conn
            .say_and_end(&session.shutting_down(), End::Shutdown)
            .await;
    }
    conn.reply(&session.greeting());
    let mut lines = LineReader::new(shared.max_line);
    // The BDAT body grows across chunks; `bdat_total` counts every octet,
    // `body` keeps them only up to the size limit.
    let mut body = Vec::new();
    let mut bdat_total: u64 = 0;
    // When the session began waiting for the next command line: a whole
    // line must come within `command_timeout` of it, however it trickles
    // in, and the session is idle (evictable) meanwhile.
    let mut waiting_since: Option<Instant> = None;
    loop {
        let step = match lines.next_line(&conn.rbuf) {
            Line::Complete { len, consumed } => {
                waiting_since = None;
                idle.busy();
                let step = session.command(&conn.rbuf[..len]);
                conn.rbuf.drain(..consumed);
                step
            }
            Line::TooLong { consumed } => {
                waiting_since = None;
                idle.busy();
                conn.rbuf.drain(..consumed);
                session.line_too_long()
            }
            Line::Discarded { consumed } => {
                conn.rbuf.drain(..consumed);
                continue;
            }
            Line::NeedMore => {
                conn.flush().await?;
                let now = Instant::now();
                if now >= deadline {
                    return conn
                        .say_and_end(&session.session_too_long(), End::Timeout)
                        .await;
                }
                let since = *waiting_since.get_or_insert_with(|| {
                    idle.waiting(now);
                    now
                });
                let line_deadline = since + shared.command_timeout;
                if now >= line_deadline {
                    return conn.say_and_end(&session.timeout(), End::Timeout).await;
                }
                let wait = line_deadline.min(deadline) - now;
                tokio::select! {
                    r = conn.fill_by(wait, COMMAND_CHUNK) => match r? {
                        Read::Data => continue,
                        Read::Closed => return Ok(End::ClientClosed),
                        Read::TimedOut if Instant::now() >= deadline => {
                            return conn.say_and_end(&session.session_too_long(), End::Timeout).await;
                        }
                        Read::TimedOut => return conn.say_and_end(&session.timeout(), End::Timeout).await,
                    },
                    _ = shared.shutdown.cancelled() => {
                        return conn.say_and_end(&session.shutting_down(), End::Shutdown).await;
                    }
                    _ = idle.evicted() => {
                        tracing::info!(client = %client, idle = ?since.elapsed(), "every slot taken: closing the idlest session");
                        return conn.say_and_end(&session.evicted(), End::Evicted).await;
                    }
                }
            }
        };
        let mut step = step;
        loop {
            match step {
                Step::CheckRecipient(to) => {
                    let size = session.declared_size();
                    let verdict = check_recipient(shared, &to, size).await;
                    step = session.recipient_checked(to, verdict);
                    continue;
                }
                Step::CheckCredentials { user, password } => {
                    let ip = client.ip().to_string();
                    let throttle = &shared.auth_throttle;
                    match throttle.before(&shared.rates, &ip, &user).await {
                        crate::auth::Before::TooMany => {
                            tracing::warn!(client = %client, user = %user, "too many failed logins from this address; turned away");
                            refused("auth_failures");
                            return conn
                                .say_and_end(&session.too_many_failed_logins(), End::Refused)
                                .await;
                        }
                        crate::auth::Before::Check(wait) if !wait.is_zero() => {
                            tracing::info!(client = %client, user = %user, ?wait, "an account with many failed logins: slowing down");
                            tokio::time::sleep(wait).await;
                        }
                        crate::auth::Before::Check(_) => {}
                    }
                    let verdict = match &shared.auth {
                        Some(a) => a.check(&user, &password.0).await,
                        None => CredentialVerdict::Invalid,
                    };
                    if verdict == CredentialVerdict::Invalid {
                        // The answer to a wrong password comes later each
                        // time (and says nothing sooner for a missing account).
                        let wait = throttle.failed(&shared.rates, &ip, &user).await;
                        tokio::time::sleep(wait).await;
                    }
                    match verdict {
                        CredentialVerdict::Valid => {
                            tracing::Span::current().record("enduser.id", user.as_str());
                            tracing::info!(client = %client, user = %user, "authenticated")
                        }
                        v => {
                            tracing::warn!(client = %client, user = %user, verdict = ?v, "authentication failed")
                        }
                    }
                    step = session.credentials_checked(user, verdict);
                    continue;
                }
                Step::Reply(r) => conn.reply(&r),
                Step::Close(r) => {
                    let end = if r.code == 221 {
                        End::Quit
                    } else {
                        End::Closed
                    };
                    return conn.say_and_end(&r, end).await;
                }
                Step::StartTls(r) => {
                    conn.reply(&r);
                    conn.flush().await?;
                    // Whatever the client pipelined after STARTTLS was sent
                    // in the clear and is dropped (CVE-2011-0411).
                    conn.rbuf.clear();
                    conn = match start_tls(shared, conn).await? {
                        Some(c) => c,
                        None => return Ok(End::Closed),
                    };
                    if let MaybeTls::Tls(s) = &conn.stream {
                        session.tls_started(describe(s));
                    }
                }
                Step::Data(r) => {
                    conn.reply(&r);
                    conn.flush().await?;
                    let reply = match receive_data(shared, &mut conn, deadline).await? {
                        None => return Ok(End::ClientClosed),
                        Some(Err(())) => {
                            return conn.say_and_end(&session.timeout(), End::Timeout).await;
                        }
                        Some(Ok((data, mut report))) => {
                            report.hops = received_count(&data);
                            match session.data_received(report) {
                                Err(r) => {
                                    refused_at_data(client, &r);
                                    r
                                }
                                Ok(env) => {
                                    let to = Arrival { client, role };
                                    deliver(shared, &mut session, env, data, to, conn.gone()).await
                                }
                            }
                        }
                    };
                    conn.reply(&reply);
                    conn.shrink();
                }
                Step::Chunk { size, last, first } => {
                    if first {
                        body.clear();
                        bdat_total = 0;
                    }
                    let max = shared.session.max_message_size;
                    match read_chunk(shared, &mut conn, size, &mut body, max, deadline).await? {
                        ChunkRead::Done => {}
                        ChunkRead::Closed => return Ok(End::ClientClosed),
                        ChunkRead::TimedOut => {
                            return conn.say_and_end(&session.timeout(), End::Timeout).await;
                        }
                    }
                    bdat_total = bdat_total.saturating_add(size);
                    let whole = last.then(|| BodyReport {
                        hops: received_count(&body),
                        ..BodyReport::default()
                    });
                    match session.chunk_received(bdat_total, whole) {
                        Chunked::Step(s) => {
                            if let Step::Reply(r) | Step::Close(r) = &s
                                && r.code >= 400
                            {
                                refused_at_data(client, r);
                            }
                            step = s;
                            continue;
                        }
                        Chunked::Queue(env) => {
                            let data = std::mem::take(&mut body);
                            let to = Arrival { client, role };
                            let reply =
                                deliver(shared, &mut session, env, data, to, conn.gone()).await;
                            conn.reply(&reply);
                            conn.shrink();
                        }
                    }
                }
            }
            break;
        }
    }
}

/// Reads and parses the PROXY header; `None` (connection dropped) when it
/// is missing, malformed or late.
async fn read_proxy_header<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
) -> std::io::Result<Option<Header>> {
    let deadline = Instant::now() + shared.proxy_timeout;
    loop {
        match proxy::parse(&conn.rbuf) {
            Ok(Some((header, used))) => {
                conn.rbuf.drain(..used);
                return Ok(Some(header));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "bad PROXY header from a proxy; closing");
                return Ok(None);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.fill_by(left, COMMAND_CHUNK).await? {
            Read::Data => {}
            Read::Closed | Read::TimedOut => return Ok(None),
        }
    }
}

/// The TLS handshake on a plain connection; `None` when it fails.
async fn start_tls<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: Conn<S>,
) -> std::io::Result<Option<Conn<S>>> {
    let (Some(tls), MaybeTls::Plain(plain)) = (&shared.tls, conn.stream) else {
        return Ok(None);
    };
    let handshakes = &crate::metrics::METRICS.tls_handshakes;
    match timeout(shared.tls_handshake_timeout, tls.acceptor().accept(plain)).await {
        Ok(Ok(s)) => {
            let version = s
                .get_ref()
                .1
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .replace('_', ".");
            tracing::Span::current().record("tls.protocol.version", version.as_str());
            handshakes.add(
                1,
                &[
                    KeyValue::new("tls.protocol.version", version),
                    KeyValue::new("result", "ok"),
                ],
            );
            Ok(Some(Conn {
                stream: MaybeTls::Tls(Box::new(s)),
                rbuf: Vec::new(),
                wbuf: Vec::new(),
            }))
        }
        Ok(Err(e)) => {
            handshakes.add(1, &[KeyValue::new("result", "failed")]);
            tracing::info!(error = %e, "TLS handshake failed");
            Ok(None)
        }
        Err(_) => {
            handshakes.add(1, &[KeyValue::new("result", "timeout")]);
            tracing::info!("TLS handshake timed out");
            Ok(None)
        }
    }
}

/// The deadline of a DATA or BDAT transfer (Postfix's
/// `smtpd_min_data_rate`): `data_timeout` from its start, pushed back by
/// each octet received at `min_data_rate` octets per second, and never
/// past the session's deadline. A client that sends a byte now and then
/// runs out of time; one on a slow but honest link does not. With a rate
/// of 0, `data_timeout` applies to each read instead.
struct TransferClock {
    end: Instant,
    session_end: Instant,
    phase: Duration,
    rate: u64,
}

impl TransferClock {
    fn start(shared: &Shared, session_end: Instant) -> Self {
        TransferClock {
            end: Instant::now() + shared.data_timeout,
            session_end,
            phase: shared.data_timeout,
            rate: shared.min_data_rate,
        }
    }

    /// `n` more octets arrived.
    fn credit(&mut self, n: usize) {
        if self.rate == 0 {
            self.end = Instant::now() + self.phase;
        } else if n > 0 {
            self.end += Duration::from_secs_f64(n as f64 / self.rate as f64);
        }
    }

    /// How long the next read may take.
    fn wait(&self) -> Duration {
        self.end
            .min(self.session_end)
            .saturating_duration_since(Instant::now())
    }
}

/// Reads the message after `354`. `None`: the client closed; `Some(Err)`:
/// it stalled past the DATA timeout.
async fn receive_data<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    deadline: Instant,
) -> std::io::Result<Option<Result<(Vec<u8>, correu_smtp::session::BodyReport), ()>>> {
    let mut rx = DataReceiver::new(shared.session.max_message_size);
    let mut body = Vec::new();
    let mut clock = TransferClock::start(shared, deadline);
    loop {
        match rx.feed(&conn.rbuf, &mut body) {
            Progress::Done(n) => {
                conn.rbuf.drain(..n);
                return Ok(Some(Ok((body, rx.report()))));
            }
            Progress::More => {
                clock.credit(conn.rbuf.len());
                conn.rbuf.clear();
            }
        }
        match conn.fill(clock.wait()).await? {
            Read::Data => {}
            Read::Closed => return Ok(None),
            Read::TimedOut => return Ok(Some(Err(()))),
        }
    }
}

enum ChunkRead {
    Done,
    Closed,
    TimedOut,
}

/// Reads exactly `size` octets of a BDAT chunk, keeping them in `body`
/// while it is within `max` (the rest is read and dropped).
async fn read_chunk<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
    size: u64,
    body: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> std::io::Result<ChunkRead> {
    let mut left = size;
    let mut clock = TransferClock::start(shared, deadline);
    loop {
        let take = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(conn.rbuf.len());
        let room = (max + 1).saturating_sub(body.len());
        body.extend_from_slice(&conn.rbuf[..take.min(room)]);
        conn.rbuf.drain(..take);
        clock.credit(take);
        left -= take as u64;
        if left == 0 {
            return Ok(ChunkRead::Done);
        }
        match conn.fill(clock.wait()).await? {
            Read::Data => {}
            Read::Closed => return Ok(ChunkRead::Closed),
            Read::TimedOut => return Ok(ChunkRead::TimedOut),
        }
    }
}

/// The recipients to queue: each as given, an alias that forwards to
/// other domains as its targets (and itself when it also has local
/// mailboxes). A forwarded copy goes out from an SRS address at the
/// alias's domain when there is a secret, and keeps the original
/// recipient in ORCPT (RFC 3461 §4.2).
fn queued_recipients(env: &Envelope, srs_secret: Option<&[u8]>) -> Vec<Recipient> {
    let sender = env.from.as_string();
    let mut out: Vec<Recipient> = Vec::with_capacity(env.recipients.len());
    let mut push = |r: Recipient| {
        if !out
            .iter()
            .any(|o| o.address.eq_ignore_ascii_case(&r.address))
        {
            out.push(r);
        }
    };
    for r in &env.recipients {
        let notify = r.params.notify.clone().unwrap_or_default();
        let orcpt = r.params.orcpt.clone().unwrap_or_default();
        let Some(f) = &r.forward else {
            push(Recipient {
                address: r.address.to_string(),
                notify,
                orcpt,
                ..Recipient::default()
            });
            continue;
        };
        if f.keep {
            push(Recipient {
                address: r.address.to_string(),
                notify: notify.clone(),
                orcpt: orcpt.clone(),
                ..Recipient::default()
            });
        }
        let alias = r.address.to_string();
        let via = match (srs_secret, sender.is_empty()) {
            (Some(secret), false) => {
                correu_smtp::srs::forward(secret, &sender, r.address.domain(), srs_day())
            }
            // The null sender stays null; without a secret the sender
            // stays as it is (Postfix's aliases do the same).
            _ => sender.clone(),
        };
        for t in &f.targets {
            push(Recipient {
                address: t.to_string(),
                notify: notify.clone(),
                orcpt: if orcpt.is_empty() {
                    format!("rfc822;{}", correu_smtp::command::encode_xtext(&alias))
                } else {
                    orcpt.clone()
                },
                sender: via.clone(),
                forwarded_by: alias.clone(),
            });
        }
    }
    out
}

/// Days since the Unix epoch, SRS's clock.
fn srs_day() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        / 86_400
}

/// Whether `to` may be given mail of `size` octets (SIZE=, 0 when not
/// declared), and where an alias forwards it.
async fn check_recipient(shared: &Shared, to: &Address, size: u64) -> RecipientVerdict {
    let address = to.to_string();
    if correu_smtp::srs::is_srs(to.local())
        && let Some(secret) = &shared.srs_secret
    {
        // A bounce to a sender we rewrote: back to the original one.
        return match correu_smtp::srs::reverse(secret, to.local(), srs_day()) {
            Ok(original) => match Address::parse(&original) {
                Ok(a) => {
                    tracing::info!(recipient = %address, original = %a, "SRS address: forwarding to the original sender");
                    RecipientVerdict::Forwards(Forward {
                        targets: vec![a],
                        keep: false,
                    })
                }
                Err(_) => RecipientVerdict::Unknown,
            },
            Err(e) => {
                tracing::info!(recipient = %address, error = %e, "SRS address refused");
                RecipientVerdict::Unknown
            }
        };
    }
    if shared.known_recipients.exists(&address) {
        return RecipientVerdict::Exists;
    }
    let mut client = shared.storage.clone();
    let req = CheckRecipientRequest {
        address: address.clone(),
        size,
    };
    match timeout(
        shared.recipient_check_timeout,
        client.check_recipient(correu_storage_client::traced(req)),
    )
    .await
    {
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            match resp.status() {
                RcptStatus::Exists if !resp.forward.is_empty() => {
                    let mut targets = Vec::new();
                    for t in &resp.forward {
                        match Address::parse(t) {
                            Ok(a) => targets.push(a),
                            Err(e) => {
                                // The aliases file is checked as it is
                                // read; a target that still does not parse
                                // makes the recipient wait, never vanish.
                                tracing::warn!(recipient = %address, target = %t, error = %e, "alias target is not an address");
                                return RecipientVerdict::TryLater;
                            }
                        }
                    }
                    RecipientVerdict::Forwards(Forward {
                        targets,
                        keep: !resp.mailboxes.is_empty(),
                    })
                }
                RcptStatus::Exists => {
                    // An answer that depends on the message's size is
                    // asked again each time.
                    if !resp.limited {
                        shared.known_recipients.remember(&address);
                    }
                    RecipientVerdict::Exists
                }
                RcptStatus::Unknown => RecipientVerdict::Unknown,
                RcptStatus::OverQuota => RecipientVerdict::OverQuota,
                RcptStatus::Unspecified => RecipientVerdict::TryLater,
            }
        }
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), message = status.message(), "recipient check failed");
            RecipientVerdict::TryLater
        }
        Err(_) => {
            tracing::warn!(timeout = ?shared.recipient_check_timeout, "recipient check timed out");
            RecipientVerdict::TryLater
        }
    }
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64
}

/// The trace header every SMTP server adds, for this session's message.
fn received_header(
    shared: &Shared,
    env: &Envelope,
    client: SocketAddr,
    id: &str,
    now_secs: i64,
) -> String {
    correu_smtp::headers::received(env, client.ip(), &shared.session.hostname, id, now_secs)
}

/// Where a message came from: the client and the port's role.
struct Arrival {
    client: SocketAddr,
    role: Role,
}

/// Checks the message rates, verifies it (MX port), queues it, and
/// returns the reply.
async fn deliver(
    shared: &Shared,
    session: &mut Session,
    env: Envelope,
    body: Vec<u8>,
    arrival: Arrival,
    gone: impl std::future::Future<Output = ()>,
) -> Reply {
    let client = arrival.client;
    let span = transaction_span(
        client,
        Some(env.helo.as_str()),
        body.len(),
        env.recipients.len(),
    );
    let trusted = shared.trusted.iter().any(|n| n.contains(client.ip()));
    let over = if let Some(user) = &env.user {
        !shared
            .rates
            .allow("user-msg", user, shared.user_message_rate)
            .await
    } else {
        !trusted
            && !shared
                .rates
                .allow("msg", &client.ip().to_string(), shared.message_rate)
                .await
    };
    if over {
        session.queued(Err(QueueFailure::Unavailable));
        rejected(450);
        let reply = Reply::new(
            450,
            correu_smtp::Enhanced(4, 7, 1),
            "Error: too many messages, slow down",
        );
        answered(&span, &reply);
        return reply;
    }
    if shared.span_addresses {
        span.record("smtp.mail_from", env.from.as_string().as_str());
    }
    let size = body.len() as u64;
    let id = correu_queue::new_queue_id();
    span.record("queue_id", id.as_str());
    // Only this server writes its Authentication-Results (RFC 8601 §5): fields that
    // arrive claiming it go first, so that only ours and our milters' stay.
    let body = match correu_smtp::headers::without_auth_results(&body, &shared.authserv_id) {
        std::borrow::Cow::Borrowed(_) => body,
        std::borrow::Cow::Owned(stripped) => {
            tracing::info!(queue_id = %id, "removed Authentication-Results that claimed to be this server's");
            stripped
        }
    };
    // Mail from the internet is verified; submission and trusted
    // networks are not (their mail is their own).
    let verify = match &shared.verifier {
        Some(v) if arrival.role == Role::Mx && !trusted && env.user.is_none() => Some(v),
        _ => None,
    };
    let mut added = String::new();
    let mut folder = String::new();
    let from_internet = arrival.role == Role::Mx && !trusted && env.user.is_none();
    let mut refusal = None;
    if from_internet && let Some(lists) = &shared.blocklists {
        let from = env.from.as_string();
        let mut domains = vec![env.helo.as_str()];
        if let Some((_, d)) = from.rsplit_once('@') {
            domains.push(d);
        }
        if let Some((reply, listed)) = lists.domains(&domains).await {
            let found: Vec<String> = listed
                .iter()
                .map(|l| format!("{}@{}={}", l.subject, l.zone, l.answer))
                .collect();
            tracing::warn!(queue_id = %id, client = %client, lists = %found.join(" "), "a domain of the message is listed in DNS blocklists: refused");
            refusal = Some(reply);
        }
    }
    let mut passed = Vec::new();
    let mut arc_set = None;
    if refusal.is_none()
        && let Some(v) = verify
    {
        let checked = verify_message(v, &env, &body, client, &id)
            .instrument(span.clone())
            .await;
        match checked.action {
            inbound::Action::Reject(r) => refusal = Some(r),
            inbound::Action::Quarantine => folder = "Junk".into(),
            inbound::Action::Accept => {}
        }
        added = checked.header;
        passed = checked.passed;
        arc_set = checked.arc_set;
    }
    if refusal.is_none()
        && from_internet
        && let Some(grey) = &shared.greylist
    {
        refusal = greylisted(grey, &env, client, &passed, &id).await;
    }
    // The milters configured for this port see the message as it would
    // be queued (with our Authentication-Results) and may change it.
    let port = match arrival.role {
        Role::Mx => "mx",
        Role::Submission => "submission",
        Role::Submissions => "submissions",
    };
    let milters: Vec<_> = shared
        .milters
        .iter()
        .filter(|m| m.ports.iter().any(|p| p == port))
        .cloned()
        .collect();
    let mut env = env;
    let mut body = body;
    if refusal.is_none() && !milters.is_empty() {
        let mut content = std::mem::take(&mut added).into_bytes();
        content.extend_from_slice(&body);
        // A sealed message (forwarded, so rare) is kept as it was, to
        // tell afterwards whether the seal still covers it.
        let sealed = arc_set.take().map(|set| (set, content.clone()));
        match filter(shared, &milters, &mut env, content, client, &id).await {
            Filtered::Go {
                content,
                quarantine,
            } => {
                // The seal stands only over what the milters left as it was.
                if let Some((set, before)) = sealed {
                    if arc_signed_parts(&content) == arc_signed_parts(&before) {
                        added = set;
                    } else {
                        tracing::info!(queue_id = %id, "a milter changed what the ARC seal covers: forwarded without it");
                    }
                }
                body = content;
                if quarantine {
                    folder = "Junk".into();
                }
            }
            Filtered::Refused(r) => refusal = Some(r),
            Filtered::Discarded => {
                let reply = session.queued(Ok(&id));
                answered(&span, &reply);
                return reply;
            }
        }
    }
    if let Some(r) = refusal {
        let reply = session.queued(Err(QueueFailure::Refused(r)));
        answered(&span, &reply);
        rejected(reply.code);
        return reply;
    }
    if let Some(set) = arc_set {
        // The ARC set goes above the Authentication-Results it repeats.
        added.insert_str(0, &set);
    }
    let prepared = Prepared { id, added, folder };
    let outcome = queue_message(shared, env, body, client, prepared, gone)
        .instrument(span.clone())
        .await;
    let reply = session.queued(outcome.as_deref().map_err(|_| QueueFailure::Unavailable));
    answered(&span, &reply);
    let m = &crate::metrics::METRICS;
    let class = crate::metrics::reply_class(reply.code);
    if reply.code == 250 {
        m.transactions.add(
            1,
            &[
                KeyValue::new("result", "accepted"),
                KeyValue::new("reply_class", class),
            ],
        );
        m.message_size.record(size, &[]);
    } else {
        rejected(reply.code);
    }
    reply
}

/// What an ARC-Message-Signature covers, to tell whether milters changed
/// it: the fields it may sign, in order, and the body.
fn arc_signed_parts(message: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let (fields, body_at) = correu_smtp::headers::fields(message);
    let signed = fields
        .into_iter()
        .map(|r| &message[r])
        .filter(|f| {
            let name = f.split(|&b| b == b':').next().unwrap_or_default();
            inbound::ARC_SIGNED
                .iter()
                .any(|s| s.as_bytes().eq_ignore_ascii_case(name.trim_ascii()))
        })
        .collect();
    (signed, &message[body_at..])
}

/// A message that reached the end of its data and was refused.
/// The span of one mail transaction, a root span of its own trace (one
/// trace per message), linked to the session's span; from the end of
/// DATA to the reply.
fn transaction_span(
    client: SocketAddr,
    helo: Option<&str>,
    size: usize,
    recipients: usize,
) -> tracing::Span {
    let session_span = tracing::Span::current();
    if let Some(helo) = helo {
        session_span.record("smtp.helo", helo);
    }
    let span = tracing::info_span!(
        parent: None,
        "smtp.transaction",
        queue_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        "otel.kind" = "server",
        "client.address" = %client.ip(),
        "messaging.message.body.size" = size as i64,
        "smtp.recipients" = recipients as i64,
        "smtp.reply.code" = tracing::field::Empty,
        "smtp.mail_from" = tracing::field::Empty,
        "otel.status_description" = tracing::field::Empty,
    );
    if let Some(sc) = correu_runtime::telemetry::span_context(&session_span) {
        correu_runtime::telemetry::add_link(&span, sc);
    }
    if let Some(t) = correu_runtime::telemetry::trace_id(&span) {
        span.record("trace_id", t.as_str());
    }
    span
}

/// Records the reply on a transaction's span: a refusal (4xx, 5xx) is
/// the span's error, with the reply as its description.
fn answered(span: &tracing::Span, reply: &Reply) {
    span.record("smtp.reply.code", i64::from(reply.code));
    if reply.code >= 400 {
        span.record("otel.status_description", reply.to_string().trim_end());
    }
}

/// A transaction refused when its data ended, before it was examined
/// (too many hops, bare line ends, too large): its own span all the same.
fn refused_at_data(client: SocketAddr, reply: &Reply) {
    let span = transaction_span(client, None, 0, 0);
    answered(&span, reply);
    rejected(reply.code);
}

fn rejected(code: u16) {
    crate::metrics::METRICS.transactions.add(
        1,
        &[
            KeyValue::new("result", "rejected"),
            KeyValue::new("reply_class", crate::metrics::reply_class(code)),
        ],
    );
}

fn refused(reason: &'static str) {
    crate::metrics::METRICS
        .connections_refused
        .add(1, &[KeyValue::new("reason", reason)]);
}

/// What the milters made of a message.
enum Filtered {
    Go {
        content: Vec<u8>,
        quarantine: bool,
    },
    Refused(Reply),
    /// Answered 250 and not queued, as a milter asked.
    Discarded,
}

/// Runs the message through `milters`, applying their changes to the
/// envelope and the content; logs and counts the verdict with the queue id.
async fn filter(
    shared: &Shared,
    milters: &[correu_runtime::config::Milter],
    env: &mut Envelope,
    content: Vec<u8>,
    client: SocketAddr,
    id: &str,
) -> Filtered {
    use crate::milter::{Message, Verdict};
    let (headers, body) = Message::split(&content);
    drop(content);
    let mut msg = Message {
        client,
        client_name: String::new(),
        helo: env.helo.clone(),
        sender: env.from.as_string(),
        recipients: env
            .recipients
            .iter()
            .map(|r| r.address.to_string())
            .collect(),
        queue_id: id.to_string(),
        hostname: shared.session.hostname.clone(),
        user: env.user.clone(),
        headers,
        body,
    };
    let verdict = crate::milter::run(milters, &mut msg).await;
    let label = match &verdict {
        Verdict::Accept => "accept",
        Verdict::Quarantine(_) => "quarantine",
        Verdict::Discard(_) => "discard",
        Verdict::Reply(r) if r.code < 500 => "tempfail",
        Verdict::Reply(_) => "reject",
    };
    crate::metrics::METRICS
        .milter_verdicts
        .add(1, &[KeyValue::new("verdict", label)]);
    match verdict {
        Verdict::Reply(r) => {
            tracing::warn!(queue_id = id, client = %client, reply = %r, "refused by a milter");
            return Filtered::Refused(r);
        }
        Verdict::Discard(why) => {
            tracing::warn!(queue_id = id, client = %client, reason = %why, "discarded by a milter: answered 250, not delivered");
            return Filtered::Discarded;
        }
        Verdict::Quarantine(ref why) => {
            tracing::warn!(queue_id = id, reason = %why, "quarantined by a milter: delivered to Junk")
        }
        Verdict::Accept => {}
    }
    // The envelope as the milters left it.
    let sender = msg.sender.trim();
    if sender != env.from.as_string() {
        match sender {
            "" => env.from = correu_smtp::command::ReversePath::Null,
            s => match Address::parse(s) {
                Ok(a) => env.from = correu_smtp::command::ReversePath::Mailbox(a),
                Err(e) => {
                    tracing::warn!(queue_id = id, sender = s, error = %e, "a milter's new sender is not an address; kept the old one")
                }
            },
        }
    }
    env.recipients.retain(|r| {
        msg.recipients
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&r.address.to_string()))
    });
    for added in &msg.recipients {
        if env
            .recipients
            .iter()
            .any(|r| r.address.to_string().eq_ignore_ascii_case(added))
        {
            continue;
        }
        match Address::parse(added) {
            Ok(address) => env.recipients.push(correu_smtp::session::Rcpt {
                address,
                params: Default::default(),
                forward: None,
            }),
            Err(e) => {
                tracing::warn!(queue_id = id, recipient = %added, error = %e, "a milter's new recipient is not an address; left out")
            }
        }
    }
    if env.recipients.is_empty() {
        tracing::warn!(
            queue_id = id,
            "the milters removed every recipient: answered 250, not delivered"
        );
        return Filtered::Discarded;
    }
    Filtered::Go {
        content: msg.join(),
        quarantine: matches!(verdict, Verdict::Quarantine(_)),
    }
}

/// Greylisting's answer for a message: `None` to go on, or the deferral.
async fn greylisted(
    grey: &crate::greylist::Greylist,
    env: &Envelope,
    client: SocketAddr,
    passed: &[String],
    id: &str,
) -> Option<Reply> {
    let count = |result: &'static str| {
        crate::metrics::METRICS
            .greylist
            .add(1, &[KeyValue::new("result", result)])
    };
    if grey.skips(passed) {
        count("skipped");
        return None;
    }
    let rcpts: Vec<String> = env
        .recipients
        .iter()
        .map(|r| r.address.to_string())
        .collect();
    match grey.check(client.ip(), &env.from.as_string(), &rcpts).await {
        crate::greylist::Grey::Pass => {
            count("passed");
            None
        }
        crate::greylist::Grey::Wait(left) => {
            count("deferred");
            tracing::info!(queue_id = id, client = %client, wait = ?left, "greylisted: deferred");
            Some(Reply::new(
                451,
                correu_smtp::Enhanced(4, 7, 1),
                format!(
                    "Greylisted: please try again in {} seconds",
                    left.as_secs().max(1)
                ),
            ))
        }
    }
}

/// Verifies a message from the internet and logs the decision with its
/// queue id: the `Authentication-Results` field, the domains that passed
/// SPF or DKIM, and what to do.
async fn verify_message(
    v: &inbound::Verifier,
    env: &Envelope,
    body: &[u8],
    client: SocketAddr,
    id: &str,
) -> inbound::Verdict {
    let from = env.from.as_string();
    let input = inbound::Input {
        client: client.ip(),
        helo: &env.helo,
        mail_from: &from,
        recipient_domains: env.recipients.iter().map(|r| r.address.domain()).collect(),
        seal_as: env
            .recipients
            .iter()
            .find(|r| r.forward.is_some())
            .map(|r| r.address.domain()),
    };
    let verdict = v.verify(&input, body).await;
    let results: Vec<String> = verdict
        .results
        .iter()
        .map(|(m, r)| format!("{m}={r}"))
        .collect();
    let action = inbound::action_label(&verdict.action);
    match &verdict.action {
        inbound::Action::Accept => {
            tracing::info!(queue_id = id, action, reason = verdict.reason, results = %results.join(" "), "inbound verification")
        }
        _ => {
            tracing::warn!(queue_id = id, action, reason = verdict.reason, results = %results.join(" "), client = %client, from = %from, "inbound verification")
        }
    }
    verdict
}

/// What is decided about a message before it is queued.
struct Prepared {
    id: String,
    /// Fields to add above `Received:` (`Authentication-Results`).
    added: String,
    /// The folder local copies go to ("" or "Junk").
    folder: String,
}

/// Publishes the message; `Ok(queue id)` once it is durable.
async fn queue_message(
    shared: &Shared,
    env: Envelope,
    body: Vec<u8>,
    client: SocketAddr,
    prepared: Prepared,
    gone: impl std::future::Future<Output = ()>,
) -> Result<String, ()> {
    let Prepared { id, added, folder } = prepared;
    let now = unix_micros();
    let mut content = added.into_bytes();
    content
        .extend_from_slice(received_header(shared, &env, client, &id, now / 1_000_000).as_bytes());
    content.extend_from_slice(&body);
    drop(body);
    let size = content.len();
    let msg = QueuedMessage {
        queue_id: id.clone(),
        sender: env.from.as_string(),
        recipients: queued_recipients(&env, shared.srs_secret.as_deref()),
        received_at_unix_micros: now,
        content,
        attempt: 0,
        client_address: client.to_string(),
        helo: env.helo.clone(),
        traceparent: String::new(),
        last_error: String::new(),
        dsn_ret: match env.params.ret {
            Some(Ret::Full) => "FULL".into(),
            Some(Ret::Headers) => "HDRS".into(),
            None => String::new(),
        },
        dsn_envid: env.params.envid.clone().unwrap_or_default(),
        smtputf8: env.params.smtputf8,
        requiretls: env.params.requiretls,
        tls_report: false,
        authenticated_user: env.user.clone().unwrap_or_default(),
        delay_warned: false,
        folder,
    };
    tracing::Span::current().record("queue_id", id.as_str());
    let span = tracing::info_span!(
        "queue.publish",
        queue_id = %id,
        "otel.kind" = "producer",
        "messaging.system" = shared.queue.system(),
        "messaging.operation.type" = "send",
        "messaging.operation.name" = "publish",
        "messaging.destination.name" = "correu.work",
        "messaging.message.id" = %id,
        "messaging.message.body.size" = msg.content.len() as i64,
        "otel.status_description" = tracing::field::Empty,
    );
    // Delivery continues this trace from the envelope (and the AMQP
    // `traceparent` header), through every retry.
    let mut msg = msg;
    msg.traceparent = span
        .in_scope(correu_runtime::telemetry::inject)
        .remove("traceparent")
        .unwrap_or_default();
    match shared
        .queue
        .publish_while(&msg, gone)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            // One line per message at info is delivery's; this step is
            // debug (`CORREU_LOG=info,correu_ingress=debug` shows it).
            tracing::debug!(queue_id = %id, from = %msg.sender, recipients = msg.recipients.len(), size, client = %client, "queued");
            Ok(id)
        }
        Err(e) => {
            span.record("otel.status_description", e.to_string().as_str());
            tracing::warn!(queue_id = %id, error = %e, "queueing failed; client told to retry");
            Err(())
        }
    }
}
