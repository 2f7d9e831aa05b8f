//! The SMTP session driver: reads bytes, runs [`correu_smtp::session::Session`],
//! writes replies, checks recipients with storage and queues messages.
//!
//! Generic over the stream, so tests drive it in memory; replies to
//! pipelined commands are gathered and written together just before the
//! driver waits for more input (RFC 2920).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use correu_proto::v1::check_recipient_response::Status as RcptStatus;
use correu_proto::v1::{CheckRecipientRequest, QueuedMessage, Recipient};
use correu_smtp::data::{DataReceiver, Progress};
use correu_smtp::headers::rfc5322_date;
use correu_smtp::session::{
    Envelope, Line, LineReader, QueueFailure, RecipientVerdict, Session, Step,
};
use correu_smtp::{Address, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tracing::Instrument;

use crate::Shared;

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How a session ended, for logs.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Quit,
    ClientClosed,
    Timeout,
    Shutdown,
    TooManyErrors,
}

struct Conn<S> {
    stream: S,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
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

    /// Reads more bytes; `Ok(false)` when the client closed.
    async fn fill(&mut self) -> std::io::Result<bool> {
        self.rbuf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.rbuf).await? > 0)
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }
}

/// Runs one session to its end.
pub async fn run_session<S>(shared: &Shared, stream: S, peer: SocketAddr) -> std::io::Result<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let relay_allowed = shared.trusted.iter().any(|n| n.contains(peer.ip()));
    let mut session = Session::new(shared.session.clone(), relay_allowed);
    let mut conn = Conn {
        stream,
        rbuf: Vec::new(),
        wbuf: Vec::new(),
    };
    if shared.shutdown.is_cancelled() {
        conn.reply(&session.shutting_down());
        conn.flush().await?;
        return Ok(End::Shutdown);
    }
    conn.reply(&session.greeting());
    let mut lines = LineReader::new(shared.max_line);
    loop {
        let step = match lines.next_line(&conn.rbuf) {
            Line::Complete { len, consumed } => {
                let step = session.command(&conn.rbuf[..len]);
                conn.rbuf.drain(..consumed);
                step
            }
            Line::TooLong { consumed } => {
                conn.rbuf.drain(..consumed);
                session.line_too_long()
            }
            Line::Discarded { consumed } => {
                conn.rbuf.drain(..consumed);
                continue;
            }
            Line::NeedMore => {
                conn.flush().await?;
                tokio::select! {
                    r = timeout(shared.command_timeout, conn.fill()) => match r {
                        Ok(Ok(true)) => continue,
                        Ok(Ok(false)) => return Ok(End::ClientClosed),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            conn.reply(&session.timeout());
                            conn.flush().await?;
                            return Ok(End::Timeout);
                        }
                    },
                    _ = shared.shutdown.cancelled() => {
                        conn.reply(&session.shutting_down());
                        conn.flush().await?;
                        return Ok(End::Shutdown);
                    }
                }
            }
        };
        let mut step = step;
        loop {
            match step {
                Step::CheckRecipient(to) => {
                    let verdict = check_recipient(shared, &to).await;
                    step = session.recipient_checked(to, verdict);
                    continue;
                }
                Step::Reply(r) => conn.reply(&r),
                Step::Close(r) => {
                    conn.reply(&r);
                    conn.flush().await?;
                    let end = if r.code == 221 {
                        End::Quit
                    } else {
                        End::TooManyErrors
                    };
                    return Ok(end);
                }
                Step::Data(r) => {
                    conn.reply(&r);
                    conn.flush().await?;
                    let reply = match receive_data(shared, &mut conn).await? {
                        None => return Ok(End::ClientClosed),
                        Some(Err(())) => {
                            conn.reply(&session.timeout());
                            conn.flush().await?;
                            return Ok(End::Timeout);
                        }
                        Some(Ok((body, overflowed))) => match session.data_received(overflowed) {
                            Err(r) => r,
                            Ok(env) => {
                                let outcome =
                                    queue_message(shared, &session, env, body, peer).await;
                                session.queued(
                                    outcome.as_deref().map_err(|_| QueueFailure::Unavailable),
                                )
                            }
                        },
                    };
                    conn.reply(&reply);
                }
            }
            break;
        }
    }
}

/// Reads the message after `354`. `None`: the client closed; `Some(Err)`:
/// it stalled past the DATA timeout.
async fn receive_data<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    conn: &mut Conn<S>,
) -> std::io::Result<Option<Result<(Vec<u8>, bool), ()>>> {
    let mut rx = DataReceiver::new(shared.session.max_message_size);
    let mut body = Vec::new();
    loop {
        match rx.feed(&conn.rbuf, &mut body) {
            Progress::Done(n) => {
                conn.rbuf.drain(..n);
                return Ok(Some(Ok((body, rx.overflowed()))));
            }
            Progress::More => conn.rbuf.clear(),
        }
        match timeout(shared.data_timeout, conn.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(None),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(Some(Err(()))),
        }
    }
}

async fn check_recipient(shared: &Shared, to: &Address) -> RecipientVerdict {
    let mut client = shared.storage.clone();
    let req = CheckRecipientRequest {
        address: to.to_string(),
    };
    match timeout(shared.recipient_check_timeout, client.check_recipient(req)).await {
        Ok(Ok(resp)) => match resp.into_inner().status() {
            RcptStatus::Exists => RecipientVerdict::Exists,
            RcptStatus::Unknown => RecipientVerdict::Unknown,
            RcptStatus::Unspecified => RecipientVerdict::TryLater,
        },
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

/// The trace header every SMTP server adds (RFC 5321 §4.4).
fn received_header(
    shared: &Shared,
    session: &Session,
    env: &Envelope,
    peer: SocketAddr,
    id: &str,
    now_secs: i64,
) -> String {
    let helo = if env.helo.is_empty() {
        "unknown"
    } else {
        env.helo.as_str()
    };
    let proto = if session.is_esmtp() { "ESMTP" } else { "SMTP" };
    let rcpt = match env.recipients.as_slice() {
        [one] => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    format!(
        "Received: from {helo} ([{ip}])\r\n\tby {host} (Correu) with {proto} id {id}{rcpt};\r\n\t{date}\r\n",
        ip = peer.ip(),
        host = shared.session.hostname,
        date = rfc5322_date(now_secs),
    )
}

/// Publishes the message; `Ok(queue id)` once it is durable.
async fn queue_message(
    shared: &Shared,
    session: &Session,
    env: Envelope,
    body: Vec<u8>,
    peer: SocketAddr,
) -> Result<String, ()> {
    let id = correu_queue::new_queue_id();
    let now = unix_micros();
    let mut content =
        received_header(shared, session, &env, peer, &id, now / 1_000_000).into_bytes();
    content.extend_from_slice(&body);
    drop(body);
    let size = content.len();
    let msg = QueuedMessage {
        queue_id: id.clone(),
        sender: env.from.as_string(),
        recipients: env
            .recipients
            .iter()
            .map(|r| Recipient {
                address: r.to_string(),
            })
            .collect(),
        received_at_unix_micros: now,
        content,
        attempt: 0,
        client_address: peer.to_string(),
        helo: env.helo.clone(),
        traceparent: String::new(),
        last_error: String::new(),
    };
    let span = tracing::info_span!("queue.publish", queue_id = %id);
    match shared.queue.publish(&msg).instrument(span).await {
        Ok(()) => {
            tracing::info!(queue_id = %id, from = %msg.sender, recipients = msg.recipients.len(), size, client = %peer, "queued");
            Ok(id)
        }
        Err(e) => {
            tracing::warn!(queue_id = %id, error = %e, "queueing failed; client told to retry");
            Err(())
        }
    }
}
