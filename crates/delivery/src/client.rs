//! The SMTP client that hands a message to the next hop (RFC 5321 §3, §4).
//!
//! One transaction per connection for now: greeting, EHLO (HELO when EHLO
//! is refused), MAIL, one RCPT per recipient, DATA with dot-stuffing, QUIT.
//! Every wait has its own deadline (RFC 5321 §4.5.3.2).

use std::time::Duration;

use correu_smtp::data::dot_stuff;
use correu_smtp::reply::{Reply, parse_reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::outcome::{Outcome, from_reply};

/// Deadlines for each phase.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub command: Duration,
    pub data: Duration,
}

/// A failure of the session itself, before every recipient had an answer.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed by the server")]
    Closed,
    #[error("unreadable reply: {0}")]
    BadReply(#[from] correu_smtp::reply::ReplyError),
    /// The server refused the session (greeting or EHLO/HELO not 2xx).
    #[error("{0}")]
    Refused(Reply),
}

/// Most bytes a reply may take; a server sending more is broken.
const MAX_REPLY_BYTES: usize = 64 * 1024;

pub struct Client<S> {
    stream: S,
    buf: Vec<u8>,
    host: String,
    timeouts: Timeouts,
    /// Extensions from the EHLO reply, upper-cased keywords with their arguments.
    extensions: Vec<String>,
}

/// The message to send.
pub struct Transaction<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub content: &'a [u8],
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S, host: &str, timeouts: Timeouts) -> Self {
        Client {
            stream,
            buf: Vec::new(),
            host: host.to_string(),
            timeouts,
            extensions: Vec::new(),
        }
    }

    async fn read_reply(&mut self, wait: Duration) -> Result<Reply, SessionError> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if self.buf.len() > MAX_REPLY_BYTES {
                return Err(SessionError::Closed);
            }
            self.buf.reserve(4096);
            match timeout(wait, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(SessionError::Timeout(wait)),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => return Err(SessionError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8], wait: Duration) -> Result<(), SessionError> {
        match timeout(wait, self.stream.write_all(bytes)).await {
            Err(_) => Err(SessionError::Timeout(wait)),
            Ok(r) => Ok(r?),
        }
    }

    async fn command(&mut self, line: &str) -> Result<Reply, SessionError> {
        let wait = self.timeouts.command;
        self.send(format!("{line}\r\n").as_bytes(), wait).await?;
        self.read_reply(wait).await
    }

    fn has(&self, keyword: &str) -> bool {
        self.extensions.iter().any(|e| {
            e.split(' ')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    /// Reads the greeting and says EHLO (or HELO).
    pub async fn hello(&mut self, helo_name: &str) -> Result<(), SessionError> {
        let greeting = self.read_reply(self.timeouts.command).await?;
        if greeting.code != 220 {
            return Err(SessionError::Refused(greeting));
        }
        let ehlo = self.command(&format!("EHLO {helo_name}")).await?;
        if ehlo.code == 250 {
            self.extensions = ehlo
                .lines
                .iter()
                .skip(1)
                .map(|l| l.to_ascii_uppercase())
                .collect();
            return Ok(());
        }
        let helo = self.command(&format!("HELO {helo_name}")).await?;
        if helo.code != 250 {
            return Err(SessionError::Refused(helo));
        }
        Ok(())
    }

    /// Runs one mail transaction; every recipient gets an outcome.
    pub async fn deliver(&mut self, t: &Transaction<'_>) -> Result<Vec<Outcome>, SessionError> {
        let mut mail = format!("MAIL FROM:<{}>", t.sender);
        if self.has("SIZE") {
            mail.push_str(&format!(" SIZE={}", t.content.len()));
        }
        if self.has("8BITMIME") && !t.content.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        let r = self.command(&mail).await?;
        if r.code != 250 {
            let o = from_reply(&r, &self.host);
            let _reset = self.command("RSET").await;
            return Ok(vec![o; t.recipients.len()]);
        }
        let mut outcomes = Vec::with_capacity(t.recipients.len());
        for rcpt in t.recipients {
            let r = self.command(&format!("RCPT TO:<{rcpt}>")).await?;
            outcomes.push(from_reply(&r, &self.host));
        }
        if !outcomes.contains(&Outcome::Delivered) {
            let _reset = self.command("RSET").await;
            return Ok(outcomes);
        }
        let r = self.command("DATA").await?;
        if r.code != 354 {
            let o = from_reply(&r, &self.host);
            let o = if o == Outcome::Delivered {
                Outcome::Temporary(format!("{} answered DATA with {r}", self.host))
            } else {
                o
            };
            for out in outcomes.iter_mut().filter(|x| **x == Outcome::Delivered) {
                *out = o.clone();
            }
            return Ok(outcomes);
        }
        let mut wire = Vec::with_capacity(t.content.len() + t.content.len() / 50 + 8);
        dot_stuff(t.content, &mut wire);
        self.send(&wire, self.timeouts.data).await?;
        // RFC 5321 §4.5.3.2.6: up to 10 minutes for the final reply.
        let r = self.read_reply(self.timeouts.data).await?;
        let o = from_reply(&r, &self.host);
        for out in outcomes.iter_mut().filter(|x| **x == Outcome::Delivered) {
            *out = o.clone();
        }
        Ok(outcomes)
    }

    /// Says QUIT; the message is already settled, so errors are only logged.
    pub async fn quit(mut self) {
        if let Err(e) = self.command("QUIT").await {
            tracing::debug!(host = %self.host, error = %e, "QUIT failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays a server from a script of (expected client line prefix, reply)
    /// over an in-memory pipe.
    async fn scripted(
        script: Vec<(&'static str, &'static str)>,
        recipients: &[&str],
    ) -> (Result<Vec<Outcome>, String>, Vec<u8>) {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            server_end
                .write_all(b"220 mx.test ESMTP\r\n")
                .await
                .unwrap();
            for (expect, reply) in script {
                // Read until the expected text has arrived.
                loop {
                    let text = String::from_utf8_lossy(&seen).to_string();
                    if text.contains(expect) {
                        break;
                    }
                    let n = server_end.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                server_end.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let mut c = Client::new(
            client_end,
            "mx.test",
            Timeouts {
                command: Duration::from_secs(5),
                data: Duration::from_secs(5),
            },
        );
        let rcpts: Vec<String> = recipients.iter().map(|s| s.to_string()).collect();
        let result = async {
            c.hello("correu.test").await.map_err(|e| e.to_string())?;
            c.deliver(&Transaction {
                sender: "jo@domini.com",
                recipients: &rcpts,
                content: b"Subject: hi\r\n\r\n.dot line\r\n",
            })
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        drop(c);
        (result, server.await.unwrap())
    }

    #[tokio::test]
    async fn sends_a_message_with_per_recipient_outcomes() {
        let (result, seen) = scripted(
            vec![
                (
                    "EHLO correu.test\r\n",
                    "250-mx.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
                ),
                ("MAIL FROM:<jo@domini.com> SIZE=26\r\n", "250 2.1.0 Ok\r\n"),
                ("RCPT TO:<a@remote.test>\r\n", "250 2.1.5 Ok\r\n"),
                ("RCPT TO:<b@remote.test>\r\n", "550 5.1.1 No such user\r\n"),
                ("RCPT TO:<c@remote.test>\r\n", "451 4.3.0 Later\r\n"),
                ("DATA\r\n", "354 Go ahead\r\n"),
                ("\r\n..dot line\r\n.\r\n", "250 2.0.0 Ok: queued\r\n"),
            ],
            &["a@remote.test", "b@remote.test", "c@remote.test"],
        )
        .await;
        let outcomes = result.unwrap();
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(matches!(&outcomes[1], Outcome::Permanent(t) if t.contains("550 5.1.1")));
        assert!(outcomes[2].is_temporary());
        assert!(String::from_utf8_lossy(&seen).contains("Subject: hi\r\n\r\n..dot line\r\n.\r\n"));
    }

    #[tokio::test]
    async fn falls_back_to_helo_and_applies_the_final_reply() {
        let (result, _) = scripted(
            vec![
                ("EHLO correu.test\r\n", "502 5.5.1 No EHLO here\r\n"),
                ("HELO correu.test\r\n", "250 mx.test\r\n"),
                ("MAIL FROM:<jo@domini.com>\r\n", "250 Ok\r\n"),
                ("RCPT TO:<a@remote.test>\r\n", "250 Ok\r\n"),
                ("DATA\r\n", "354 Go ahead\r\n"),
                ("\r\n.\r\n", "452 4.3.1 Out of space\r\n"),
            ],
            &["a@remote.test"],
        )
        .await;
        let outcomes = result.unwrap();
        assert!(matches!(&outcomes[0], Outcome::Temporary(t) if t.contains("452 4.3.1")));
    }

    #[tokio::test]
    async fn a_refused_sender_answers_for_every_recipient() {
        let (result, _) = scripted(
            vec![
                ("EHLO correu.test\r\n", "250 mx.test\r\n"),
                (
                    "MAIL FROM:<jo@domini.com>\r\n",
                    "553 5.7.1 Sender rejected\r\n",
                ),
                ("RSET\r\n", "250 Ok\r\n"),
            ],
            &["a@remote.test", "b@remote.test"],
        )
        .await;
        let outcomes = result.unwrap();
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Permanent(_))));
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_is_a_session_error() {
        let (result, _) = scripted(
            vec![("EHLO correu.test\r\n", "421 4.3.2 Going away\r\n")],
            &["a@remote.test"],
        )
        .await;
        let e = result.unwrap_err();
        assert!(
            e.contains("closed") || e.contains("broken pipe") || e.contains("reset"),
            "{e}"
        );
    }
}
