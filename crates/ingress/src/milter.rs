//! A milter client (the Sendmail/Postfix mail filter protocol, version 6),
//! so the filters operators already run (rspamd, OpenDKIM, OpenDMARC)
//! plug in unchanged.
//!
//! Each configured milter (`[[inbound.milters]]`) gets one connection per
//! message, once the message is in: option negotiation, then connect,
//! HELO, MAIL, each RCPT, DATA, each header, end of headers, the body in
//! chunks of at most 64 KiB, and end of message, leaving out the steps the
//! milter said it does not want and not waiting for replies it said it
//! will not send. Its actions are honoured: accept, continue, reject
//! (with its own reply), tempfail, discard, quarantine (the Junk folder),
//! add, insert and change headers, add and delete recipients, change the
//! sender, replace the body. A milter that cannot be reached or does not
//! answer within its `timeout` gets its `default_action`: `tempfail`
//! (`451 4.7.1`, as Postfix's `milter_default_action`) or `accept`.
//!
//! There are no milters of our own making, so no crate was used: the
//! maintained Rust client (miltr-client) calls itself a bare test tool;
//! the protocol is small and this module is its one implementation.

use std::net::SocketAddr;
use std::time::Duration;

use correu_runtime::config::{Milter, MilterDefault};
use correu_smtp::{Enhanced, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version 6 (Sendmail 8.14, Postfix 2.6 and later).
const VERSION: u32 = 6;
/// Actions this client carries out: add headers, change body, add and
/// delete recipients, change headers, quarantine, change sender, add
/// recipients with arguments.
const ACTIONS: u32 = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80;
/// Steps a milter may leave out (`NO*`), replies it may not send
/// (`NR_*`), `SKIP` and leading spaces in header values: all of them, as
/// Postfix offers (this client never sends unknown commands or rejected
/// recipients, so asking to leave those out costs nothing).
const PROTOCOL: u32 = 0x1F_FFFF;

// Steps a milter does not want (SMFIP_NO*).
const NO_CONNECT: u32 = 0x1;
const NO_HELO: u32 = 0x2;
const NO_MAIL: u32 = 0x4;
const NO_RCPT: u32 = 0x8;
const NO_BODY: u32 = 0x10;
const NO_HDRS: u32 = 0x20;
const NO_EOH: u32 = 0x40;
const NO_DATA: u32 = 0x200;
// Replies a milter will not send (SMFIP_NR_*).
const NR_HDR: u32 = 0x80;
const NR_CONN: u32 = 0x1000;
const NR_HELO: u32 = 0x2000;
const NR_MAIL: u32 = 0x4000;
const NR_RCPT: u32 = 0x8000;
const NR_DATA: u32 = 0x10000;
const NR_EOH: u32 = 0x40000;
const NR_BODY: u32 = 0x80000;
/// Header values keep their leading space (SMFIP_HDR_LEADSPC).
const HDR_LEADSPC: u32 = 0x10_0000;

/// Body chunks are at most this (MILTER_CHUNK_SIZE).
const CHUNK: usize = 65_535;
/// The longest packet read from a milter.
const MAX_PACKET: usize = 64 << 20;

/// What a message looks like to the milters, and what they made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub client: SocketAddr,
    pub client_name: String,
    pub helo: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub queue_id: String,
    pub hostname: String,
    pub user: Option<String>,
    /// Header fields as received: name and raw value (after the colon,
    /// with its line ends), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How the conversation with all milters ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the message (as modified).
    Accept,
    /// Into the Junk folder, with the milter's reason.
    Quarantine(String),
    /// Taken (250) and not delivered, as the milter asked.
    Discard(String),
    Reply(Reply),
}

/// One reply of a milter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Response {
    Accept,
    Continue,
    Discard,
    Reject,
    Tempfail,
    ReplyCode(String),
    Skip,
    Progress,
    AddHeader(String, String),
    InsertHeader(u32, String, String),
    ChangeHeader(u32, String, String),
    AddRcpt(String),
    DelRcpt(String),
    ChangeFrom(String),
    ReplaceBody(Vec<u8>),
    Quarantine(String),
    Other(u8),
}

#[derive(Debug, thiserror::Error)]
pub enum MilterError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Runs `msg` through each milter in turn (each sees what the one before
/// made of it); the first that rejects, tempfails or discards ends it.
pub async fn run(milters: &[Milter], msg: &mut Message) -> Verdict {
    let mut verdict = Verdict::Accept;
    for m in milters {
        match converse(m, msg).await {
            Ok(Verdict::Accept) => {}
            Ok(Verdict::Quarantine(why)) => verdict = Verdict::Quarantine(why),
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(milter = %m.name, queue_id = %msg.queue_id, error = %e, default = ?m.default_action, "milter failed; its default action applies");
                crate::metrics::METRICS
                    .milter_failures
                    .add(1, &[opentelemetry::KeyValue::new("milter", m.name.clone())]);
                if m.default_action == MilterDefault::Tempfail {
                    return Verdict::Reply(Reply::new(
                        451,
                        Enhanced(4, 7, 1),
                        "Error: content filter unavailable, try again later",
                    ));
                }
            }
        }
    }
    verdict
}

/// One conversation with one milter.
async fn converse(m: &Milter, msg: &mut Message) -> Result<Verdict, MilterError> {
    let wait = m.timeout.get();
    match m.address.strip_prefix("unix:") {
        Some(path) => {
            let s = tokio::time::timeout(wait, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| MilterError::Timeout(wait))?
                .map_err(MilterError::Connect)?;
            Conversation::new(s, wait).run(msg).await
        }
        None => {
            let s = tokio::time::timeout(wait, tokio::net::TcpStream::connect(m.address.as_str()))
                .await
                .map_err(|_| MilterError::Timeout(wait))?
                .map_err(MilterError::Connect)?;
            s.set_nodelay(true)?;
            Conversation::new(s, wait).run(msg).await
        }
    }
}

struct Conversation<S> {
    stream: S,
    wait: Duration,
    protocol: u32,
    actions: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conversation<S> {
    fn new(stream: S, wait: Duration) -> Self {
        Conversation {
            stream,
            wait,
            protocol: 0,
            actions: 0,
        }
    }

    async fn run(mut self, msg: &mut Message) -> Result<Verdict, MilterError> {
        let v = self.steps(msg).await;
        // Whatever happened, say goodbye (a milter keeps no state then).
        let _quit = self.send(b'Q', &[]).await;
        v
    }

    async fn steps(&mut self, msg: &mut Message) -> Result<Verdict, MilterError> {
        self.negotiate().await?;
        let p = self.protocol;
        // Before each step, the macros milters read (rspamd and OpenDKIM
        // use the queue id, the authenticated user and our name).
        let mut connect_macros = vec![
            ("j", msg.hostname.clone()),
            ("{daemon_name}", "correu".to_string()),
            ("{client_addr}", msg.client.ip().to_string()),
            ("{client_name}", msg.client_name.clone()),
            ("_", format!("{} [{}]", msg.client_name, msg.client.ip())),
        ];
        connect_macros.retain(|(_, v)| !v.is_empty());
        self.macros(b'C', &connect_macros).await?;
        if p & NO_CONNECT == 0 {
            let mut d = cstr(&msg.client_name_or_ip());
            let (family, addr) = match msg.client.ip() {
                std::net::IpAddr::V4(a) => (b'4', a.to_string()),
                std::net::IpAddr::V6(a) => (b'6', a.to_string()),
            };
            d.push(family);
            d.extend_from_slice(&msg.client.port().to_be_bytes());
            d.extend_from_slice(&cstr(&addr));
            if let Some(v) = self.step(b'C', &d, p & NR_CONN != 0).await? {
                return Ok(v);
            }
        }
        if p & NO_HELO == 0
            && let Some(v) = self.step(b'H', &cstr(&msg.helo), p & NR_HELO != 0).await?
        {
            return Ok(v);
        }
        let mut mail_macros = vec![("{i}", msg.queue_id.clone())];
        if let Some(u) = &msg.user {
            mail_macros.push(("{auth_authen}", u.clone()));
            mail_macros.push(("{auth_type}", "PLAIN".to_string()));
        }
        self.macros(b'M', &mail_macros).await?;
        if p & NO_MAIL == 0
            && let Some(v) = self
                .step(b'M', &cstr(&format!("<{}>", msg.sender)), p & NR_MAIL != 0)
                .await?
        {
            return Ok(v);
        }
        if p & NO_RCPT == 0 {
            for r in msg.recipients.clone() {
                if let Some(v) = self
                    .step(b'R', &cstr(&format!("<{r}>")), p & NR_RCPT != 0)
                    .await?
                {
                    return Ok(v);
                }
            }
        }
        if p & NO_DATA == 0
            && let Some(v) = self.step(b'T', &[], p & NR_DATA != 0).await?
        {
            return Ok(v);
        }
        if p & NO_HDRS == 0 {
            for (name, value) in msg.headers.clone() {
                let mut d = cstr(&name);
                d.extend_from_slice(&cstr(&header_value(&value, p & HDR_LEADSPC != 0)));
                if let Some(v) = self.step(b'L', &d, p & NR_HDR != 0).await? {
                    return Ok(v);
                }
            }
        }
        if p & NO_EOH == 0
            && let Some(v) = self.step(b'N', &[], p & NR_EOH != 0).await?
        {
            return Ok(v);
        }
        if p & NO_BODY == 0 {
            for chunk in msg.body.clone().chunks(CHUNK) {
                match self.step_or_skip(b'B', chunk, p & NR_BODY != 0).await? {
                    Step::Go => {}
                    Step::Skip => break,
                    Step::End(v) => return Ok(v),
                }
            }
        }
        self.macros(b'E', &[("{i}", msg.queue_id.clone())]).await?;
        self.send(b'E', &[]).await?;
        self.end_of_message(msg).await
    }

    async fn negotiate(&mut self) -> Result<(), MilterError> {
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&VERSION.to_be_bytes());
        d.extend_from_slice(&ACTIONS.to_be_bytes());
        d.extend_from_slice(&PROTOCOL.to_be_bytes());
        self.send(b'O', &d).await?;
        let (cmd, data) = self.read().await?;
        if cmd != b'O' || data.len() < 12 {
            return Err(MilterError::Protocol(format!(
                "option negotiation answered with {:?}",
                cmd as char
            )));
        }
        let version = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        if version < 2 {
            return Err(MilterError::Protocol(format!("version {version}")));
        }
        self.actions = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) & ACTIONS;
        self.protocol = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
        Ok(())
    }

    async fn macros(&mut self, step: u8, macros: &[(&str, String)]) -> Result<(), MilterError> {
        let mut d = vec![step];
        for (k, v) in macros {
            d.extend_from_slice(&cstr(k));
            d.extend_from_slice(&cstr(v));
        }
        self.send(b'D', &d).await
    }

    /// Sends a step and reads its reply (unless none comes): `Some` when
    /// the milter ended the message there.
    async fn step(
        &mut self,
        cmd: u8,
        data: &[u8],
        no_reply: bool,
    ) -> Result<Option<Verdict>, MilterError> {
        match self.step_or_skip(cmd, data, no_reply).await? {
            Step::End(v) => Ok(Some(v)),
            Step::Go | Step::Skip => Ok(None),
        }
    }

    async fn step_or_skip(
        &mut self,
        cmd: u8,
        data: &[u8],
        no_reply: bool,
    ) -> Result<Step, MilterError> {
        self.send(cmd, data).await?;
        if no_reply {
            return Ok(Step::Go);
        }
        loop {
            let r = self.response().await?;
            return Ok(match r {
                Response::Continue => Step::Go,
                Response::Skip => Step::Skip,
                Response::Progress => continue,
                Response::Accept => Step::End(Verdict::Accept),
                Response::Discard => Step::End(Verdict::Discard("discard".into())),
                Response::Reject => Step::End(Verdict::Reply(rejected())),
                Response::Tempfail => Step::End(Verdict::Reply(tempfailed())),
                Response::ReplyCode(text) => Step::End(Verdict::Reply(reply_code(&text))),
                other => {
                    return Err(MilterError::Protocol(format!(
                        "{other:?} before the end of the message"
                    )));
                }
            });
        }
    }

    /// Modifications, then the final word.
    async fn end_of_message(&mut self, msg: &mut Message) -> Result<Verdict, MilterError> {
        let mut new_body: Option<Vec<u8>> = None;
        let mut quarantine = None;
        loop {
            let r = self.response().await?;
            match r {
                Response::Progress => {}
                Response::AddHeader(n, v) if self.may(0x01) => {
                    msg.headers.push((n, from_milter(&v)))
                }
                Response::InsertHeader(i, n, v) if self.may(0x01) => {
                    let at = (i as usize).min(msg.headers.len());
                    msg.headers.insert(at, (n, from_milter(&v)));
                }
                Response::ChangeHeader(i, n, v) if self.may(0x10) => {
                    change_header(&mut msg.headers, i, &n, &v)
                }
                Response::AddRcpt(r) if self.may(0x04 | 0x80) => {
                    let r = unbracket(&r);
                    if !msg.recipients.iter().any(|x| x.eq_ignore_ascii_case(&r)) {
                        msg.recipients.push(r);
                    }
                }
                Response::DelRcpt(r) if self.may(0x08) => {
                    let r = unbracket(&r);
                    msg.recipients.retain(|x| !x.eq_ignore_ascii_case(&r));
                }
                Response::ChangeFrom(f) if self.may(0x40) => msg.sender = unbracket(&f),
                Response::ReplaceBody(chunk) if self.may(0x02) => new_body
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&chunk),
                Response::Quarantine(why) if self.may(0x20) => quarantine = Some(why),
                Response::Accept | Response::Continue => break,
                Response::Discard => return Ok(Verdict::Discard("discard".into())),
                Response::Reject => return Ok(Verdict::Reply(rejected())),
                Response::Tempfail => return Ok(Verdict::Reply(tempfailed())),
                Response::ReplyCode(text) => return Ok(Verdict::Reply(reply_code(&text))),
                other => {
                    return Err(MilterError::Protocol(format!(
                        "{other:?} not negotiated or not at the end of the message"
                    )));
                }
            }
        }
        if let Some(b) = new_body {
            msg.body = b;
        }
        Ok(match quarantine {
            Some(why) => Verdict::Quarantine(why),
            None => Verdict::Accept,
        })
    }

    fn may(&self, action: u32) -> bool {
        self.actions & action != 0
    }

    async fn send(&mut self, cmd: u8, data: &[u8]) -> Result<(), MilterError> {
        let len = u32::try_from(data.len() + 1)
            .map_err(|_| MilterError::Protocol("packet too long".into()))?;
        let mut packet = Vec::with_capacity(data.len() + 5);
        packet.extend_from_slice(&len.to_be_bytes());
        packet.push(cmd);
        packet.extend_from_slice(data);
        tokio::time::timeout(self.wait, self.stream.write_all(&packet))
            .await
            .map_err(|_| MilterError::Timeout(self.wait))??;
        Ok(())
    }

    async fn read(&mut self) -> Result<(u8, Vec<u8>), MilterError> {
        let wait = self.wait;
        let read = async {
            let mut len = [0u8; 4];
            self.stream.read_exact(&mut len).await?;
            let len = u32::from_be_bytes(len) as usize;
            if len == 0 || len > MAX_PACKET {
                return Err(MilterError::Protocol(format!("packet of {len} octets")));
            }
            let mut data = vec![0u8; len];
            self.stream.read_exact(&mut data).await?;
            let cmd = data.remove(0);
            Ok((cmd, data))
        };
        tokio::time::timeout(wait, read)
            .await
            .map_err(|_| MilterError::Timeout(wait))?
    }

    async fn response(&mut self) -> Result<Response, MilterError> {
        let (cmd, data) = self.read().await?;
        parse_response(cmd, &data)
    }
}

enum Step {
    Go,
    Skip,
    End(Verdict),
}

impl Message {
    fn client_name_or_ip(&self) -> String {
        if self.client_name.is_empty() {
            format!("[{}]", self.client.ip())
        } else {
            self.client_name.clone()
        }
    }

    /// Splits a message into header fields and body; a header section
    /// with a line that is not a field is all body, as RFC 5322 allows.
    pub fn split(content: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
        let (fields, body_at) = correu_smtp::headers::fields(content);
        let mut headers = Vec::with_capacity(fields.len());
        for f in fields {
            let text = String::from_utf8_lossy(&content[f]).into_owned();
            match text.split_once(':') {
                Some((name, value)) if !text.starts_with([' ', '\t']) => {
                    headers.push((name.trim_end().to_string(), value.to_string()))
                }
                _ => return (Vec::new(), content.to_vec()),
            }
        }
        (headers, content[body_at..].to_vec())
    }

    /// The message again: every field as `name:value` (values keep their
    /// own line ends), the empty line, the body.
    pub fn join(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 2048);
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            if !value.ends_with('\n') {
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A header value as milters expect it: without its line end, folded
/// lines joined by a bare LF (as Sendmail and Postfix send them), the
/// leading space dropped unless the milter asked for it.
fn header_value(raw: &str, lead_space: bool) -> String {
    let v = raw.strip_suffix('\n').unwrap_or(raw);
    let v = v.strip_suffix('\r').unwrap_or(v);
    let v = v.replace("\r\n", "\n");
    if lead_space {
        v
    } else {
        v.strip_prefix(' ').map(str::to_string).unwrap_or(v)
    }
}

/// A value a milter gave, as a field value of ours: a leading space, CRLF
/// line ends, and no control characters but folding.
fn from_milter(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 4);
    if !v.starts_with([' ', '\t']) {
        out.push(' ');
    }
    let mut prev_cr = false;
    for c in v.chars() {
        match c {
            '\n' => {
                if !prev_cr {
                    out.push('\r');
                }
                out.push('\n');
            }
            '\r' => out.push('\r'),
            '\t' => out.push('\t'),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
        prev_cr = c == '\r';
    }
    // A folded line must go on with white space, or it would be a field.
    let mut folded = String::with_capacity(out.len());
    let mut lines = out.split("\r\n").peekable();
    while let Some(l) = lines.next() {
        folded.push_str(l);
        if lines.peek().is_some() {
            folded.push_str("\r\n");
            if lines.peek().is_some_and(|n| !n.starts_with([' ', '\t'])) {
                folded.push('\t');
            }
        }
    }
    folded.push_str("\r\n");
    folded
}

/// `m`: the `index`-th field named `name` (from 1) gets `value`, or is
/// removed when `value` is empty; a field that is not there is added.
fn change_header(headers: &mut Vec<(String, String)>, index: u32, name: &str, value: &str) {
    let nth = headers
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.eq_ignore_ascii_case(name))
        .nth(index.max(1) as usize - 1)
        .map(|(i, _)| i);
    match (nth, value.is_empty()) {
        (Some(i), true) => {
            headers.remove(i);
        }
        (Some(i), false) => headers[i].1 = from_milter(value),
        (None, true) => {}
        (None, false) => headers.push((name.to_string(), from_milter(value))),
    }
}

fn unbracket(a: &str) -> String {
    let a = a.trim();
    let a = a.split_whitespace().next().unwrap_or(a);
    a.trim_start_matches('<').trim_end_matches('>').to_string()
}

fn rejected() -> Reply {
    Reply::new(550, Enhanced(5, 7, 1), "Error: rejected by content filter")
}

fn tempfailed() -> Reply {
    Reply::new(
        451,
        Enhanced(4, 7, 1),
        "Error: content filter says try again later",
    )
}

/// `y`: the milter's own reply (`554 5.7.1 Gtube pattern`), kept to
/// 4xx/5xx and printable text; a code out of range is a plain reject.
fn reply_code(text: &str) -> Reply {
    let text = text.trim_end_matches('\0').trim();
    let mut words = text.splitn(2, ' ');
    let code: u16 = words.next().and_then(|c| c.parse().ok()).unwrap_or(550);
    let rest = words.next().unwrap_or("").trim();
    let code = if (400..600).contains(&code) {
        code
    } else {
        550
    };
    // The first line only; a multi-line reply keeps its first line.
    let rest = rest.lines().next().unwrap_or("").trim();
    let (enhanced, rest) = match rest.split_once(' ') {
        Some((e, r)) if parse_enhanced(e).is_some() => (parse_enhanced(e), r),
        _ => (None, rest),
    };
    let class = (code / 100) as u8;
    let enhanced = match enhanced {
        Some(e) if e.0 == class => e,
        _ => Enhanced(class, 7, 1),
    };
    let rest: String = rest.chars().filter(|c| !c.is_control()).collect();
    let rest = if rest.is_empty() {
        "Error: rejected by content filter".to_string()
    } else {
        rest
    };
    Reply::new(code, enhanced, rest)
}

fn parse_enhanced(s: &str) -> Option<Enhanced> {
    let mut p = s.split('.');
    let a: u8 = p.next()?.parse().ok()?;
    let b: u16 = p.next()?.parse().ok()?;
    let c: u16 = p.next()?.parse().ok()?;
    if p.next().is_some() || !(a == 4 || a == 5) || b > 999 || c > 999 {
        return None;
    }
    Some(Enhanced(a, b, c))
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().filter(|&b| b != 0).collect();
    v.push(0);
    v
}

/// The NUL-separated strings of a packet.
fn strings(data: &[u8]) -> Vec<String> {
    data.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn parse_response(cmd: u8, data: &[u8]) -> Result<Response, MilterError> {
    let s = strings(data);
    let first = || s.first().cloned().unwrap_or_default();
    let index = || -> Result<(u32, Vec<String>), MilterError> {
        if data.len() < 4 {
            return Err(MilterError::Protocol("short header change".into()));
        }
        Ok((
            u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            strings(&data[4..]),
        ))
    };
    Ok(match cmd {
        b'a' => Response::Accept,
        b'c' => Response::Continue,
        b'd' => Response::Discard,
        b'r' => Response::Reject,
        b't' => Response::Tempfail,
        b'y' => Response::ReplyCode(first()),
        b's' => Response::Skip,
        b'p' => Response::Progress,
        b'h' => Response::AddHeader(first(), s.get(1).cloned().unwrap_or_default()),
        b'i' => {
            let (i, s) = index()?;
            Response::InsertHeader(
                i,
                s.first().cloned().unwrap_or_default(),
                s.get(1).cloned().unwrap_or_default(),
            )
        }
        b'm' => {
            let (i, s) = index()?;
            Response::ChangeHeader(
                i,
                s.first().cloned().unwrap_or_default(),
                s.get(1).cloned().unwrap_or_default(),
            )
        }
        b'+' | b'2' => Response::AddRcpt(first()),
        b'-' => Response::DelRcpt(first()),
        b'e' => Response::ChangeFrom(first()),
        b'b' => Response::ReplaceBody(data.to_vec()),
        b'q' => Response::Quarantine(first()),
        other => Response::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_and_join_as_they_were() {
        let m = b"Subject: a\r\nX-Long: one\r\n\ttwo\r\nFrom: <jo@a.test>\r\n\r\nbody\r\n.x\r\n";
        let (headers, body) = Message::split(m);
        assert_eq!(headers.len(), 3);
        assert_eq!(headers[1], ("X-Long".into(), " one\r\n\ttwo\r\n".into()));
        assert_eq!(body, b"body\r\n.x\r\n");
        let msg = Message {
            client: "127.0.0.1:1".parse().unwrap(),
            client_name: String::new(),
            helo: String::new(),
            sender: String::new(),
            recipients: vec![],
            queue_id: String::new(),
            hostname: String::new(),
            user: None,
            headers,
            body,
        };
        assert_eq!(msg.join(), m.to_vec());
        assert_eq!(header_value(" one\r\n\ttwo\r\n", false), "one\n\ttwo");
        assert_eq!(header_value(" one\r\n", true), " one");
    }

    #[test]
    fn values_from_a_milter_cannot_start_a_field() {
        assert_eq!(from_milter("pass"), " pass\r\n");
        assert_eq!(from_milter("a\nb"), " a\r\n\tb\r\n");
        assert_eq!(from_milter("a\n\tb"), " a\r\n\tb\r\n");
        assert_eq!(from_milter("x\0y"), " x?y\r\n");
    }

    #[test]
    fn header_changes_follow_the_milter_protocol() {
        let mut h = vec![
            ("Subject".to_string(), " a\r\n".to_string()),
            ("X-Spam".to_string(), " 1\r\n".to_string()),
            ("x-spam".to_string(), " 2\r\n".to_string()),
        ];
        change_header(&mut h, 2, "X-Spam", "yes");
        assert_eq!(h[2].1, " yes\r\n");
        change_header(&mut h, 1, "X-Spam", "");
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].1, " yes\r\n");
        change_header(&mut h, 1, "X-New", "v");
        assert_eq!(h[2], ("X-New".to_string(), " v\r\n".to_string()));
    }

    #[test]
    fn a_milters_own_reply_is_kept_to_what_a_client_may_read() {
        assert_eq!(
            reply_code("554 5.7.1 Gtube pattern").to_string(),
            "554 5.7.1 Gtube pattern"
        );
        assert_eq!(
            reply_code("451 Try later\r\n").to_string(),
            "451 4.7.1 Try later"
        );
        // A 2xx is not a milter's to give; an enhanced code of the wrong
        // class is replaced.
        assert_eq!(reply_code("250 ok").code, 550);
        assert_eq!(reply_code("550 4.1.1 no").to_string(), "550 5.7.1 no");
        assert_eq!(
            reply_code("garbage").to_string(),
            "550 5.7.1 Error: rejected by content filter"
        );
    }
}
