//! The SMTP client that hands a message to the next hop (RFC 5321 §3, §4).
//!
//! Greeting, EHLO (HELO when EHLO is refused), STARTTLS when offered (or
//! required by the route), AUTH for smarthosts, then one transaction: MAIL,
//! a RCPT per recipient and DATA, pipelined when the server offers
//! PIPELINING (RFC 2920), the body dot-stuffed. SIZE is checked before
//! sending and SMTPUTF8 negotiated. Every wait has its own deadline
//! (RFC 5321 §4.5.3.2).

use std::fmt;
use std::time::Duration;

use base64::Engine;
use correu_smtp::data::dot_stuff;
use correu_smtp::reply::{Reply, parse_reply};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::outcome::{Outcome, from_reply};
use crate::tls::TlsPolicy;

/// The phases of a session, each with a deadline of its own (KumoMTA's
/// names), so a timeout says where the remote host stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Banner,
    Ehlo,
    Starttls,
    Auth,
    Mail,
    Rcpt,
    Data,
    DataEnd,
    Rset,
    Quit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Banner => "banner",
            Phase::Ehlo => "EHLO",
            Phase::Starttls => "STARTTLS",
            Phase::Auth => "AUTH",
            Phase::Mail => "MAIL",
            Phase::Rcpt => "RCPT",
            Phase::Data => "DATA",
            Phase::DataEnd => "data end",
            Phase::Rset => "RSET",
            Phase::Quit => "QUIT",
        })
    }
}

/// Deadlines per phase (`[delivery.timeouts]`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub banner: Duration,
    pub ehlo: Duration,
    pub starttls: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data: Duration,
    pub data_end: Duration,
}

impl Timeouts {
    pub fn from_config(t: &correu_runtime::config::ClientTimeouts) -> Timeouts {
        Timeouts {
            connect: t.connect.get(),
            banner: t.banner.get(),
            ehlo: t.ehlo.get(),
            starttls: t.starttls.get(),
            mail: t.mail.get(),
            rcpt: t.rcpt.get(),
            data: t.data.get(),
            data_end: t.data_end.get(),
        }
    }

    /// Every phase the same (tests).
    pub fn all(d: Duration) -> Timeouts {
        Timeouts {
            connect: d,
            banner: d,
            ehlo: d,
            starttls: d,
            mail: d,
            rcpt: d,
            data: d,
            data_end: d,
        }
    }

    /// The deadline of `phase`: AUTH waits as EHLO does, RSET and QUIT as
    /// MAIL does.
    pub fn of(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Connect => self.connect,
            Phase::Banner => self.banner,
            Phase::Ehlo | Phase::Auth => self.ehlo,
            Phase::Starttls => self.starttls,
            Phase::Mail | Phase::Rset | Phase::Quit => self.mail,
            Phase::Rcpt => self.rcpt,
            Phase::Data => self.data,
            Phase::DataEnd => self.data_end,
        }
    }
}

/// A failure of the session itself, before every recipient had an answer.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply to {0} within {1:?}")]
    Timeout(Phase, Duration),
    #[error("connection closed by the server")]
    Closed,
    #[error("unreadable reply: {0}")]
    BadReply(#[from] correu_smtp::reply::ReplyError),
    /// The server refused the session (greeting or EHLO/HELO not 2xx).
    #[error("{0}")]
    Refused(Reply),
    /// TLS was required and is not possible with this server.
    #[error("TLS required: {0}")]
    TlsRequired(String),
    /// Opportunistic STARTTLS failed in its handshake (no common cipher,
    /// a broken server): the connection is gone; plaintext may follow.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    #[error("authentication with the relay failed: {0}")]
    Auth(Reply),
}

/// Most bytes a reply may take; a server sending more is broken.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Any byte stream: TCP, TLS over TCP, or memory in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Client {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
    host: String,
    timeouts: Timeouts,
    /// Extensions from the EHLO reply, upper-cased, with their arguments.
    extensions: Vec<String>,
    /// The TLS in use, for logs ("TLSv1.3 with cipher …").
    pub tls: Option<String>,
    /// How the server's certificate was checked (`dane`, `ca`, `none`);
    /// empty without TLS.
    pub tls_verify: &'static str,
    /// How long the TCP connection took, and STARTTLS with its handshake
    /// and the EHLO after it (for the delivery log line).
    pub connect_time: std::time::Duration,
    pub tls_time: std::time::Duration,
    /// Transactions this connection has carried, this one included.
    pub uses: u32,
    /// The current transaction's message text went out (the server may
    /// have it even if its reply never came).
    body_sent: bool,
}

/// The message to send, with the DSN parameters to pass on.
pub struct Transaction<'a> {
    pub sender: &'a str,
    pub recipients: &'a [RcptParams<'a>],
    pub content: &'a [u8],
    /// The message needs SMTPUTF8 (RFC 6531) at the next hop.
    pub smtputf8: bool,
    /// The message was sent with REQUIRETLS (RFC 8689): the next hop must
    /// offer it, under TLS, and is told with MAIL FROM.
    pub requiretls: bool,
    pub ret: &'a str,
    pub envid: &'a str,
}

/// One recipient with its DSN parameters (RFC 3461).
pub struct RcptParams<'a> {
    pub address: &'a str,
    pub notify: &'a str,
    pub orcpt: &'a str,
}

impl Client {
    pub fn new(stream: impl Io + 'static, host: &str, timeouts: Timeouts) -> Self {
        Client {
            stream: Box::new(stream),
            buf: Vec::new(),
            host: host.to_string(),
            timeouts,
            extensions: Vec::new(),
            tls: None,
            tls_verify: "",
            connect_time: std::time::Duration::ZERO,
            tls_time: std::time::Duration::ZERO,
            uses: 0,
            body_sent: false,
        }
    }

    async fn read_reply(&mut self, phase: Phase) -> Result<Reply, SessionError> {
        let wait = self.timeouts.of(phase);
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
                Err(_) => return Err(SessionError::Timeout(phase, wait)),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => return Err(SessionError::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8], phase: Phase) -> Result<(), SessionError> {
        let wait = self.timeouts.of(phase);
        match timeout(wait, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        {
            Err(_) => Err(SessionError::Timeout(phase, wait)),
            Ok(r) => Ok(r?),
        }
    }

    async fn command(&mut self, line: &str, phase: Phase) -> Result<Reply, SessionError> {
        self.send(format!("{line}\r\n").as_bytes(), phase).await?;
        self.read_reply(phase).await
    }

    /// The arguments of an EHLO keyword, if the server offered it.
    fn extension(&self, keyword: &str) -> Option<&str> {
        self.extensions.iter().find_map(|e| {
            let (k, args) = e.split_once(' ').unwrap_or((e.as_str(), ""));
            k.eq_ignore_ascii_case(keyword).then_some(args)
        })
    }

    fn has(&self, keyword: &str) -> bool {
        self.extension(keyword).is_some()
    }

    async fn ehlo(&mut self, helo_name: &str) -> Result<(), SessionError> {
        let ehlo = self
            .command(&format!("EHLO {helo_name}"), Phase::Ehlo)
            .await?;
        if ehlo.code == 250 {
            self.extensions = ehlo
                .lines
                .iter()
                .skip(1)
                .map(|l| l.to_ascii_uppercase())
                .collect();
            return Ok(());
        }
        self.extensions.clear();
        let helo = self
            .command(&format!("HELO {helo_name}"), Phase::Ehlo)
            .await?;
        if helo.code != 250 {
            return Err(SessionError::Refused(helo));
        }
        Ok(())
    }

    /// Reads the greeting, says EHLO (or HELO), and starts TLS as `policy`
    /// asks: whenever offered, or required (and verified) for this hop.
    pub async fn hello(&mut self, helo_name: &str, policy: &TlsPolicy) -> Result<(), SessionError> {
        let greeting = self.read_reply(Phase::Banner).await?;
        if greeting.code != 220 {
            return Err(SessionError::Refused(greeting));
        }
        self.ehlo(helo_name).await?;
        let Some(connector) = policy.connector() else {
            return Ok(());
        };
        if !self.has("STARTTLS") {
            if policy.required() {
                return Err(SessionError::TlsRequired(format!(
                    "{} does not offer STARTTLS",
                    self.host
                )));
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let r = self.command("STARTTLS", Phase::Starttls).await?;
        if r.code != 220 {
            if policy.required() {
                return Err(SessionError::TlsRequired(format!(
                    "{} refused STARTTLS: {r}",
                    self.host
                )));
            }
            return Ok(());
        }
        let name = ServerName::try_from(self.host.clone()).map_err(|_| {
            SessionError::TlsRequired(format!("{} is not a name TLS can check", self.host))
        })?;
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
        self.buf.clear();
        let wait = self.timeouts.starttls;
        let tls = match timeout(wait, connector.connect(name, plain)).await {
            Err(_) => return Err(SessionError::Timeout(Phase::Starttls, wait)),
            Ok(Err(e)) if policy.required() => {
                return Err(SessionError::TlsRequired(format!("{}: {e}", self.host)));
            }
            Ok(Err(e)) => return Err(SessionError::TlsHandshake(format!("{}: {e}", self.host))),
            Ok(Ok(s)) => s,
        };
        self.tls = Some(crate::tls::describe(&tls));
        self.tls_verify = policy.verification();
        self.stream = Box::new(tls);
        // RFC 3207 §4.2: everything learnt before TLS is forgotten.
        let r = self.ehlo(helo_name).await;
        self.tls_time = started.elapsed();
        r
    }

    /// AUTH PLAIN (RFC 4954, RFC 4616) with a relay that asks for it.
    pub async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), SessionError> {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let r = self
            .command(&format!("AUTH PLAIN {token}"), Phase::Auth)
            .await?;
        if r.code != 235 {
            return Err(SessionError::Auth(r));
        }
        Ok(())
    }

    /// Runs one mail transaction; every recipient gets an outcome.
    pub async fn deliver(&mut self, t: &Transaction<'_>) -> Result<Vec<Outcome>, SessionError> {
        let n = t.recipients.len();
        self.body_sent = false;
        // RFC 1870: a message larger than the server takes is refused here.
        if let Some(limit) = self
            .extension("SIZE")
            .and_then(|a| a.trim().parse::<usize>().ok())
            && limit > 0
            && t.content.len() > limit
        {
            let o = Outcome::perm(
                "5.3.4",
                format!(
                    "message of {} octets is larger than {} takes ({limit})",
                    t.content.len(),
                    self.host
                ),
            );
            return Ok(vec![o; n]);
        }
        let needs_utf8 = t.smtputf8
            || !t.sender.is_ascii()
            || t.recipients.iter().any(|r| !r.address.is_ascii());
        if needs_utf8 && !self.has("SMTPUTF8") {
            let o = Outcome::perm(
                "5.6.7",
                format!(
                    "{} does not support SMTPUTF8, which the message needs",
                    self.host
                ),
            );
            return Ok(vec![o; n]);
        }
        // RFC 8689 §4.2.1: a REQUIRETLS message goes only to a server
        // that offers REQUIRETLS under TLS; else it bounces (§5).
        if t.requiretls && (self.tls.is_none() || !self.has("REQUIRETLS")) {
            let o = Outcome::perm(
                "5.7.30",
                format!(
                    "REQUIRETLS support required: {} does not offer REQUIRETLS{}",
                    self.host,
                    if self.tls.is_none() { " over TLS" } else { "" }
                ),
            );
            return Ok(vec![o; n]);
        }
        let dsn = self.has("DSN");
        let mut mail = format!("MAIL FROM:<{}>", t.sender);
        if t.requiretls {
            mail.push_str(" REQUIRETLS");
        }
        if self.has("SIZE") {
            mail.push_str(&format!(" SIZE={}", t.content.len()));
        }
        if self.has("8BITMIME") && !t.content.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_utf8 {
            mail.push_str(" SMTPUTF8");
        }
        if dsn && !t.ret.is_empty() {
            mail.push_str(&format!(" RET={}", t.ret));
        }
        if dsn && !t.envid.is_empty() {
            mail.push_str(&format!(" ENVID={}", t.envid));
        }
        let rcpt_lines: Vec<String> = t
            .recipients
            .iter()
            .map(|r| {
                let mut line = format!("RCPT TO:<{}>", r.address);
                if dsn && !r.notify.is_empty() {
                    line.push_str(&format!(" NOTIFY={}", r.notify));
                }
                if dsn && !r.orcpt.is_empty() {
                    line.push_str(&format!(" ORCPT={}", r.orcpt));
                }
                line
            })
            .collect();

        let (mail_reply, rcpt_replies, data_reply) = if self.has("PIPELINING") {
            // MAIL, every RCPT and DATA in one write (RFC 2920 §3.1).
            let mut batch = format!("{mail}\r\n");
            for l in &rcpt_lines {
                batch.push_str(l);
                batch.push_str("\r\n");
            }
            batch.push_str("DATA\r\n");
            self.send(batch.as_bytes(), Phase::Mail).await?;
            let m = self.read_reply(Phase::Mail).await?;
            let mut rs = Vec::with_capacity(n);
            for _ in 0..n {
                rs.push(self.read_reply(Phase::Rcpt).await?);
            }
            let d = self.read_reply(Phase::Data).await?;
            (m, rs, Some(d))
        } else {
            let m = self.command(&mail, Phase::Mail).await?;
            let mut rs = Vec::with_capacity(n);
            if m.code == 250 {
                for l in &rcpt_lines {
                    rs.push(self.command(l, Phase::Rcpt).await?);
                }
            }
            (m, rs, None)
        };
        if mail_reply.code != 250 {
            let o = from_reply(&mail_reply, &self.host);
            self.abandon(data_reply.as_ref()).await?;
            return Ok(vec![o; n]);
        }
        let mut outcomes: Vec<Outcome> = rcpt_replies
            .iter()
            .map(|r| from_reply(r, &self.host))
            .collect();
        if !outcomes.iter().any(Outcome::is_delivered) {
            self.abandon(data_reply.as_ref()).await?;
            return Ok(outcomes);
        }
        let data_reply = match data_reply {
            Some(d) => d,
            None => self.command("DATA", Phase::Data).await?,
        };
        if data_reply.code != 354 {
            let o = match from_reply(&data_reply, &self.host) {
                Outcome::Delivered { .. } => Outcome::temp(
                    "4.5.0",
                    format!("{} answered DATA with {data_reply}", self.host),
                ),
                other => other,
            };
            for out in outcomes.iter_mut().filter(|x| x.is_delivered()) {
                *out = o.clone();
            }
            return Ok(outcomes);
        }
        let mut wire = Vec::with_capacity(t.content.len() + t.content.len() / 50 + 8);
        dot_stuff(t.content, &mut wire);
        self.body_sent = true;
        self.send(&wire, Phase::DataEnd).await?;
        // RFC 5321 §4.5.3.2.6: up to 10 minutes for the final reply.
        let r = self.read_reply(Phase::DataEnd).await?;
        let o = from_reply(&r, &self.host);
        for out in outcomes.iter_mut().filter(|x| x.is_delivered()) {
            *out = o.clone();
        }
        Ok(outcomes)
    }

    /// Ends a transaction that will not send a message: a pipelined DATA
    /// that got 354 anyway receives an empty message's end; then RSET.
    async fn abandon(&mut self, data_reply: Option<&Reply>) -> Result<(), SessionError> {
        if data_reply.is_some_and(|d| d.code == 354) {
            self.send(b".\r\n", Phase::DataEnd).await?;
            self.read_reply(Phase::DataEnd).await?;
        }
        let _reset = self.command("RSET", Phase::Rset).await?;
        Ok(())
    }

    /// Whether the last [`Client::deliver`] sent the message text: after a
    /// failure, a server that got the final dot may have taken the message
    /// (RFC 1047), so it is not sent again at once.
    pub fn body_sent(&self) -> bool {
        self.body_sent
    }

    /// RSET after a transaction, so the connection can carry another.
    pub async fn reset(&mut self) -> Result<(), SessionError> {
        let r = self.command("RSET", Phase::Rset).await?;
        if r.code != 250 {
            return Err(SessionError::Refused(r));
        }
        Ok(())
    }

    /// Says QUIT; the message is already settled, so errors are only logged.
    pub async fn quit(mut self) {
        if let Err(e) = self.command("QUIT", Phase::Quit).await {
            tracing::debug!(host = %self.host, error = %e, "QUIT failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays a server from a script of (expected client text, reply) over
    /// an in-memory pipe; returns the outcomes and what the client sent.
    async fn scripted(
        greeting_ehlo: &'static str,
        script: Vec<(&'static str, &'static str)>,
        recipients: &[&str],
        content: &'static [u8],
        smtputf8: bool,
    ) -> (Result<Vec<Outcome>, String>, String) {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            server_end
                .write_all(b"220 mx.test ESMTP\r\n")
                .await
                .unwrap();
            let mut script = script;
            script.insert(0, ("EHLO correu.test\r\n", greeting_ehlo));
            for (expect, reply) in script {
                loop {
                    if String::from_utf8_lossy(&seen).contains(expect) {
                        break;
                    }
                    let n = server_end.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return String::from_utf8_lossy(&seen).into_owned();
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                server_end.write_all(reply.as_bytes()).await.unwrap();
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        let mut c = Client::new(client_end, "mx.test", Timeouts::all(Duration::from_secs(5)));
        let rcpts: Vec<RcptParams> = recipients
            .iter()
            .map(|a| RcptParams {
                address: a,
                notify: "",
                orcpt: "",
            })
            .collect();
        let result = async {
            c.hello("correu.test", &TlsPolicy::None)
                .await
                .map_err(|e| e.to_string())?;
            c.deliver(&Transaction {
                sender: "jo@domini.com",
                recipients: &rcpts,
                content,
                smtputf8,
                requiretls: false,
                ret: "",
                envid: "",
            })
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        drop(c);
        (result, server.await.unwrap())
    }

    #[tokio::test]
    async fn pipelines_and_reports_per_recipient() {
        let (result, seen) = scripted(
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
            vec![
                (
                    "MAIL FROM:<jo@domini.com> SIZE=26\r\nRCPT TO:<a@remote.test>\r\nRCPT TO:<b@remote.test>\r\nRCPT TO:<c@remote.test>\r\nDATA\r\n",
                    "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n451 4.3.0 Later\r\n354 Go ahead\r\n",
                ),
                ("\r\n..dot line\r\n.\r\n", "250 2.0.0 Ok: queued\r\n"),
            ],
            &["a@remote.test", "b@remote.test", "c@remote.test"],
            b"Subject: hi\r\n\r\n.dot line\r\n",
            false,
        )
        .await;
        let outcomes = result.unwrap();
        assert!(outcomes[0].is_delivered());
        assert!(matches!(&outcomes[1], Outcome::Permanent(f) if f.status == "5.1.1"));
        assert!(outcomes[2].is_temporary());
        assert!(seen.contains("Subject: hi\r\n\r\n..dot line\r\n.\r\n"));
    }

    #[tokio::test]
    async fn falls_back_to_helo_and_applies_the_final_reply() {
        let (result, _) = scripted(
            "502 5.5.1 No EHLO here\r\n",
            vec![
                ("HELO correu.test\r\n", "250 mx.test\r\n"),
                ("MAIL FROM:<jo@domini.com>\r\n", "250 Ok\r\n"),
                ("RCPT TO:<a@remote.test>\r\n", "250 Ok\r\n"),
                ("DATA\r\n", "354 Go ahead\r\n"),
                ("\r\n.\r\n", "452 4.3.1 Out of space\r\n"),
            ],
            &["a@remote.test"],
            b"x\r\n",
            false,
        )
        .await;
        assert!(matches!(&result.unwrap()[0], Outcome::Temporary(f) if f.status == "4.3.1"));
    }

    #[tokio::test]
    async fn a_refused_sender_answers_for_every_recipient() {
        let (result, _) = scripted(
            "250 mx.test\r\n",
            vec![
                (
                    "MAIL FROM:<jo@domini.com>\r\n",
                    "553 5.7.1 Sender rejected\r\n",
                ),
                ("RSET\r\n", "250 Ok\r\n"),
            ],
            &["a@remote.test", "b@remote.test"],
            b"x\r\n",
            false,
        )
        .await;
        let outcomes = result.unwrap();
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Permanent(_))));
    }

    #[tokio::test]
    async fn size_and_smtputf8_are_checked_before_sending() {
        let (result, seen) = scripted(
            "250-mx.test\r\n250 SIZE 10\r\n",
            vec![],
            &["a@remote.test"],
            b"more than ten octets\r\n",
            false,
        )
        .await;
        assert!(matches!(&result.unwrap()[0], Outcome::Permanent(f) if f.status == "5.3.4"));
        assert!(!seen.contains("MAIL FROM"), "nothing sent: {seen}");
        let (result, _) = scripted(
            "250 mx.test\r\n",
            vec![],
            &["ànna@remote.test"],
            b"x\r\n",
            true,
        )
        .await;
        assert!(matches!(&result.unwrap()[0], Outcome::Permanent(f) if f.status == "5.6.7"));
        let (result, seen) = scripted(
            "250-mx.test\r\n250 SMTPUTF8\r\n",
            vec![
                ("MAIL FROM:<jo@domini.com> SMTPUTF8\r\n", "250 Ok\r\n"),
                ("RCPT TO:<ànna@remote.test>\r\n", "250 Ok\r\n"),
                ("DATA\r\n", "354 Go\r\n"),
                ("\r\n.\r\n", "250 Ok\r\n"),
            ],
            &["ànna@remote.test"],
            b"x\r\n",
            true,
        )
        .await;
        assert!(result.unwrap()[0].is_delivered(), "{seen}");
    }

    /// A server that answers everything but RCPT: the error names the
    /// phase, after RCPT's own deadline (time is paused: no real wait).
    #[tokio::test(start_paused = true)]
    async fn a_timeout_names_its_phase() {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            server_end.write_all(b"220 mx.test\r\n").await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = String::new();
            loop {
                let n = server_end.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                if seen.ends_with("EHLO correu.test\r\n") {
                    server_end.write_all(b"250 mx.test\r\n").await.unwrap();
                    seen.clear();
                } else if seen.starts_with("MAIL") {
                    server_end.write_all(b"250 Ok\r\n").await.unwrap();
                    seen.clear();
                }
                // RCPT: no answer, ever.
            }
        });
        let mut t = Timeouts::all(Duration::from_secs(300));
        t.rcpt = Duration::from_secs(7);
        let mut c = Client::new(client_end, "mx.test", t);
        c.hello("correu.test", &TlsPolicy::None).await.unwrap();
        let rcpts = [RcptParams {
            address: "a@remote.test",
            notify: "",
            orcpt: "",
        }];
        let started = tokio::time::Instant::now();
        let e = c
            .deliver(&Transaction {
                sender: "jo@domini.com",
                recipients: &rcpts,
                content: b"x\r\n",
                smtputf8: false,
                ret: "",
                envid: "",
                requiretls: false,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Timeout(Phase::Rcpt, _)), "{e}");
        assert_eq!(e.to_string(), "no reply to RCPT within 7s");
        assert_eq!(started.elapsed(), Duration::from_secs(7));
        drop(c);
        server.abort();
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_is_a_session_error() {
        let (result, _) = scripted(
            "421 4.3.2 Going away\r\n",
            vec![],
            &["a@remote.test"],
            b"x\r\n",
            false,
        )
        .await;
        let e = result.unwrap_err();
        assert!(
            e.contains("closed") || e.contains("broken pipe") || e.contains("reset"),
            "{e}"
        );
    }
}
