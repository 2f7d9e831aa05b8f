//! The server side of an SMTP session as a state machine, with no IO.
//!
//! The driver reads command lines with [`LineReader`], gives each to
//! [`Session::command`] and acts on the [`Step`] it gets back. Two steps need
//! the outside world: a recipient in a local domain is checked by the driver,
//! which hands the verdict to [`Session::recipient_checked`]; and a received
//! message is queued by the driver, which hands the outcome to
//! [`Session::queued`]. Everything else is decided here, so the whole
//! dialogue is tested without sockets.

use std::sync::Arc;

use crate::address::Address;
use crate::command::{Command, CommandError, MailParams, ReversePath, parse_command};
use crate::reply::{Enhanced, Reply};

/// What a session needs to know about the server.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The name in the greeting and EHLO reply.
    pub hostname: String,
    /// Domains whose mail is stored here (lower case).
    pub local_domains: Vec<String>,
    /// Largest message accepted, in octets (SIZE, RFC 1870).
    pub max_message_size: usize,
    /// Most recipients in one transaction (RFC 5321 §4.5.3.1.8 asks for 100).
    pub max_recipients: usize,
    /// Errors (4xx/5xx replies to commands) before the session is closed.
    pub max_errors: usize,
}

impl SessionConfig {
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the reply and read the next command.
    Reply(Reply),
    /// Send the reply and close the connection.
    Close(Reply),
    /// Ask whether this local recipient exists, then call
    /// [`Session::recipient_checked`].
    CheckRecipient(Address),
    /// Send the `354` reply and read the message with a DATA receiver.
    Data(Reply),
}

/// The answer to [`Step::CheckRecipient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientVerdict {
    Exists,
    Unknown,
    /// The lookup could not be done now (storage unreachable, timeout).
    TryLater,
}

/// A complete envelope, handed out when the message is received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub helo: String,
    pub from: ReversePath,
    pub params: MailParams,
    pub recipients: Vec<Address>,
}

/// Why the queue did not take a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFailure {
    /// The queue is unreachable or did not confirm in time: `451 4.3.0`.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before HELO/EHLO.
    Connected,
    /// After HELO/EHLO, no transaction.
    Ready,
    /// MAIL accepted; recipients may follow.
    Mail,
    /// DATA accepted; the driver is receiving the message.
    Data,
    /// The message is received; the driver is queuing it.
    Queuing,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    state: State,
    esmtp: bool,
    relay_allowed: bool,
    helo: String,
    from: ReversePath,
    params: MailParams,
    recipients: Vec<Address>,
    errors: usize,
}

fn reply(code: u16, e: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::new(code, Enhanced(e.0, e.1, e.2), text)
}

impl Session {
    /// A new session. `relay_allowed` says whether this client may send to
    /// domains that are not local (a trusted network, or authenticated).
    pub fn new(cfg: Arc<SessionConfig>, relay_allowed: bool) -> Self {
        Session {
            cfg,
            state: State::Connected,
            esmtp: false,
            relay_allowed,
            helo: String::new(),
            from: ReversePath::Null,
            params: MailParams::default(),
            recipients: Vec::new(),
            errors: 0,
        }
    }

    /// The `220` greeting (RFC 5321 §4.3.1).
    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP Correu", self.cfg.hostname))
    }

    /// The reply to a command line longer than the limit.
    pub fn line_too_long(&mut self) -> Step {
        self.error(reply(500, (5, 5, 2), "Error: line too long"))
    }

    /// The reply given to a client that sent nothing in time.
    pub fn timeout(&self) -> Reply {
        reply(
            421,
            (4, 4, 2),
            format!("{} Error: timeout exceeded", self.cfg.hostname),
        )
    }

    /// The reply given to new or idle sessions while the server stops.
    pub fn shutting_down(&self) -> Reply {
        reply(
            421,
            (4, 3, 2),
            format!(
                "{} Service shutting down, try again later",
                self.cfg.hostname
            ),
        )
    }

    /// Recipients accepted so far in this transaction.
    pub fn recipients(&self) -> &[Address] {
        &self.recipients
    }

    fn reset(&mut self) {
        self.state = if self.state == State::Connected {
            State::Connected
        } else {
            State::Ready
        };
        self.from = ReversePath::Null;
        self.params = MailParams::default();
        self.recipients.clear();
    }

    /// Counts an error reply and closes the session past the limit.
    fn error(&mut self, r: Reply) -> Step {
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            return Step::Close(reply(
                421,
                (4, 7, 0),
                format!("{} Error: too many errors", self.cfg.hostname),
            ));
        }
        Step::Reply(r)
    }

    /// Handles one command line (without CRLF).
    pub fn command(&mut self, line: &[u8]) -> Step {
        debug_assert!(
            !matches!(self.state, State::Data | State::Queuing),
            "command while receiving a message"
        );
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.error(command_error_reply(&e)),
        };
        match cmd {
            Command::Helo(name) => {
                self.reset();
                self.state = State::Ready;
                self.esmtp = false;
                self.helo = name;
                Step::Reply(Reply::plain(250, self.cfg.hostname.clone()))
            }
            Command::Ehlo(name) => {
                self.reset();
                self.state = State::Ready;
                self.esmtp = true;
                self.helo = name;
                let lines = vec![
                    self.cfg.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.cfg.max_message_size),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                Step::Reply(Reply::multi(250, None, lines))
            }
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to),
            Command::Data => self.data(),
            Command::Rset => {
                self.reset();
                Step::Reply(reply(250, (2, 0, 0), "Ok"))
            }
            Command::Noop => Step::Reply(reply(250, (2, 0, 0), "Ok")),
            // RFC 5321 §3.5.3: 252 when the server will not say.
            Command::Vrfy(_) => Step::Reply(reply(
                252,
                (2, 5, 2),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Help(_) => Step::Reply(Reply::multi(
                214,
                Some(Enhanced(2, 0, 0)),
                vec![
                    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT".into(),
                    "See RFC 5321".into(),
                ],
            )),
            Command::Quit => Step::Close(reply(221, (2, 0, 0), "Bye")),
        }
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) -> Step {
        match self.state {
            State::Connected => {
                return self.error(reply(503, (5, 5, 1), "Error: send HELO/EHLO first"));
            }
            State::Mail => return self.error(reply(503, (5, 5, 1), "Error: nested MAIL command")),
            _ => {}
        }
        if let Some(size) = params.size
            && size > self.cfg.max_message_size as u64
        {
            return self.error(reply(552, (5, 3, 4), "Message size exceeds fixed limit"));
        }
        self.state = State::Mail;
        self.from = from;
        self.params = params;
        self.recipients.clear();
        Step::Reply(reply(250, (2, 1, 0), "Ok"))
    }

    fn rcpt(&mut self, to: Address) -> Step {
        if self.state != State::Mail {
            return self.error(reply(503, (5, 5, 1), "Error: need MAIL command"));
        }
        if self.recipients.contains(&to) {
            // A repeated recipient gets one copy (RFC 5321 §3.3 allows this).
            return Step::Reply(reply(250, (2, 1, 5), "Ok"));
        }
        if self.recipients.len() >= self.cfg.max_recipients {
            return self.error(reply(452, (4, 5, 3), "Error: too many recipients"));
        }
        if self.cfg.is_local_domain(to.domain()) {
            return Step::CheckRecipient(to);
        }
        if !self.relay_allowed {
            return self.error(reply(
                550,
                (5, 7, 1),
                format!("<{to}>: Relay access denied"),
            ));
        }
        self.recipients.push(to);
        Step::Reply(reply(250, (2, 1, 5), "Ok"))
    }

    /// The driver's answer to [`Step::CheckRecipient`].
    pub fn recipient_checked(&mut self, to: Address, verdict: RecipientVerdict) -> Step {
        match verdict {
            RecipientVerdict::Exists => {
                self.recipients.push(to);
                Step::Reply(reply(250, (2, 1, 5), "Ok"))
            }
            RecipientVerdict::Unknown => self.error(reply(
                550,
                (5, 1, 1),
                format!("<{to}>: Recipient address rejected: User unknown"),
            )),
            RecipientVerdict::TryLater => self.error(reply(
                451,
                (4, 3, 0),
                format!("<{to}>: Temporary lookup failure, try again later"),
            )),
        }
    }

    fn data(&mut self) -> Step {
        match self.state {
            State::Mail if !self.recipients.is_empty() => {
                self.state = State::Data;
                Step::Data(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"))
            }
            State::Mail => self.error(reply(503, (5, 5, 1), "Error: need RCPT command")),
            _ => self.error(reply(503, (5, 5, 1), "Error: need MAIL command")),
        }
    }

    /// The message after `354` was received. `overflowed` says it was over
    /// the size limit. Returns the envelope to queue, or the reply to send.
    pub fn data_received(&mut self, overflowed: bool) -> Result<Envelope, Reply> {
        debug_assert_eq!(self.state, State::Data);
        if overflowed {
            self.reset();
            return Err(reply(552, (5, 3, 4), "Message size exceeds fixed limit"));
        }
        self.state = State::Queuing;
        Ok(Envelope {
            helo: self.helo.clone(),
            from: self.from.clone(),
            params: self.params.clone(),
            recipients: self.recipients.clone(),
        })
    }

    /// The outcome of queuing the message: `Ok(queue id)` or why not.
    pub fn queued(&mut self, outcome: Result<&str, QueueFailure>) -> Reply {
        self.reset();
        match outcome {
            Ok(id) => reply(250, (2, 0, 0), format!("Ok: queued as {id}")),
            Err(QueueFailure::Unavailable) => {
                reply(451, (4, 3, 0), "Error: queue unavailable, try again later")
            }
        }
    }

    /// Whether the client said EHLO (and may use the extensions).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    pub fn helo(&self) -> &str {
        &self.helo
    }
}

/// The reply to a line that did not parse (RFC 5321 §4.2.4, RFC 3463).
pub fn command_error_reply(e: &CommandError) -> Reply {
    match e {
        CommandError::Unrecognized | CommandError::NotUtf8 => {
            reply(500, (5, 5, 2), "Error: command not recognized")
        }
        CommandError::Syntax(usage) => reply(501, (5, 5, 4), format!("Syntax: {usage}")),
        CommandError::Sender(e) => reply(501, (5, 1, 7), format!("Bad sender address syntax: {e}")),
        CommandError::Recipient(e) => {
            reply(501, (5, 1, 3), format!("Bad recipient address syntax: {e}"))
        }
        CommandError::Parameter(p) => reply(555, (5, 5, 4), format!("Unsupported option: {p}")),
        CommandError::ParameterValue(p) => {
            reply(501, (5, 5, 4), format!("Bad parameter value: {p}"))
        }
    }
}

/// Splits command lines out of a read buffer, bounding their length
/// (RFC 5321 §4.5.3.1.4: 512 octets with the CRLF).
#[derive(Debug)]
pub struct LineReader {
    max: usize,
    discarding: bool,
}

/// What [`LineReader::next_line`] found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line of this many bytes without its end, and the bytes to consume
    /// with the end.
    Complete { len: usize, consumed: usize },
    /// The line is over the limit; consume this many bytes and reply once.
    TooLong { consumed: usize },
    /// The rest of an over-long line, already answered; consume silently.
    Discarded { consumed: usize },
    /// No complete line yet.
    NeedMore,
}

impl LineReader {
    pub fn new(max: usize) -> Self {
        LineReader {
            max,
            discarding: false,
        }
    }

    /// Finds the next line at the start of `buf`. A line ends in LF; a CR
    /// before it is dropped (clients that end commands in a bare LF are
    /// served too; in DATA, only CRLF counts).
    pub fn next_line(&mut self, buf: &[u8]) -> Line {
        let window = &buf[..buf.len().min(self.max + 1)];
        match window.iter().position(|&b| b == b'\n') {
            Some(nl) => {
                let len = if nl > 0 && buf[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                if self.discarding {
                    self.discarding = false;
                    return Line::Discarded { consumed: nl + 1 };
                }
                Line::Complete {
                    len,
                    consumed: nl + 1,
                }
            }
            None if buf.len() > self.max => {
                // The end of the over-long line may already be here.
                let end = buf[window.len()..].iter().position(|&b| b == b'\n');
                let consumed = end.map_or(buf.len(), |p| window.len() + p + 1);
                let answered = std::mem::replace(&mut self.discarding, end.is_none());
                if answered {
                    Line::Discarded { consumed }
                } else {
                    Line::TooLong { consumed }
                }
            }
            None => Line::NeedMore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            local_domains: vec!["localhost".into(), "domini.com".into()],
            max_message_size: 1000,
            max_recipients: 2,
            max_errors: 10,
        })
    }

    fn text(step: &Step) -> String {
        match step {
            Step::Reply(r) | Step::Close(r) | Step::Data(r) => {
                String::from_utf8(r.to_bytes()).unwrap()
            }
            Step::CheckRecipient(a) => format!("check {a}"),
        }
    }

    /// Runs a transcript: each command and the reply it must get.
    fn run(s: &mut Session, transcript: &[(&str, &str)]) {
        for (cmd, want) in transcript {
            let step = s.command(cmd.as_bytes());
            let got = text(&step);
            assert!(got.starts_with(want), "{cmd:?}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn seed_session() {
        let mut s = Session::new(cfg(), false);
        assert_eq!(s.greeting().to_bytes(), b"220 mx.test ESMTP Correu\r\n");
        run(
            &mut s,
            &[
                ("HELO", "250 mx.test"),
                ("MAIL FROM: jo@domini.com", "250 2.1.0"),
                ("RCPT TO: pere@domini.com", "check pere@domini.com"),
            ],
        );
        let to = Address::parse("pere@domini.com").unwrap();
        assert_eq!(
            text(&s.recipient_checked(to, RecipientVerdict::Exists)),
            "250 2.1.5 Ok\r\n"
        );
        run(&mut s, &[("DATA", "354 ")]);
        let env = s.data_received(false).unwrap();
        assert_eq!(env.from.as_string(), "jo@domini.com");
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(
            s.queued(Ok("ABC")).to_bytes(),
            b"250 2.0.0 Ok: queued as ABC\r\n"
        );
        run(&mut s, &[("quit", "221 2.0.0")]);
        assert!(matches!(s.command(b"QUIT"), Step::Close(_)));
    }

    #[test]
    fn order_and_relay_rules() {
        let mut s = Session::new(cfg(), false);
        run(
            &mut s,
            &[
                ("MAIL FROM:<a@b.c>", "503 5.5.1"),
                (
                    "EHLO client",
                    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n",
                ),
                ("RCPT TO:<x@localhost>", "503 5.5.1"),
                ("DATA", "503 5.5.1 Error: need MAIL"),
                ("MAIL FROM:<a@b.c> SIZE=5000", "552 5.3.4"),
                ("MAIL FROM:<>", "250 2.1.0"),
                ("MAIL FROM:<a@b.c>", "503 5.5.1 Error: nested"),
                ("DATA", "503 5.5.1 Error: need RCPT"),
                (
                    "RCPT TO:<x@elsewhere.org>",
                    "550 5.7.1 <x@elsewhere.org>: Relay access denied",
                ),
                ("RSET", "250 2.0.0"),
                ("NOOP", "250 2.0.0"),
                ("VRFY x", "252 2.5.2"),
                ("HELP", "214-2.0.0 "),
            ],
        );
    }

    #[test]
    fn trusted_client_may_relay_up_to_the_recipient_limit() {
        let mut s = Session::new(cfg(), true);
        run(
            &mut s,
            &[
                ("EHLO c", "250-"),
                ("MAIL FROM:<a@b.c>", "250 2.1.0"),
                ("RCPT TO:<x@elsewhere.org>", "250 2.1.5"),
                ("RCPT TO:<x@elsewhere.org>", "250 2.1.5"),
                ("RCPT TO:<y@elsewhere.org>", "250 2.1.5"),
                ("RCPT TO:<z@elsewhere.org>", "452 4.5.3"),
            ],
        );
        assert_eq!(s.recipients().len(), 2);
    }

    #[test]
    fn unknown_user_and_lookup_failure() {
        let mut s = Session::new(cfg(), false);
        run(&mut s, &[("HELO c", "250"), ("MAIL FROM:<a@b.c>", "250")]);
        let to = Address::parse("nobody@localhost").unwrap();
        assert!(
            text(&s.recipient_checked(to.clone(), RecipientVerdict::Unknown))
                .starts_with("550 5.1.1")
        );
        assert!(
            text(&s.recipient_checked(to, RecipientVerdict::TryLater)).starts_with("451 4.3.0")
        );
        assert!(s.recipients().is_empty());
    }

    #[test]
    fn bad_commands_answered_then_closed_past_the_limit() {
        let strict = Arc::new(SessionConfig {
            max_errors: 5,
            ..(*cfg()).clone()
        });
        let mut s = Session::new(strict, false);
        run(
            &mut s,
            &[
                ("HELO c", "250"),
                ("BOGUS", "500 5.5.2"),
                ("MAIL FROM:<bad>", "501 5.1.7"),
                ("MAIL FROM:<a@b.c> X=1", "555 5.5.4"),
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<a@>", "501 5.1.3"),
            ],
        );
        assert_eq!(
            text(&s.command(b"\xff\xfe")),
            "421 4.7.0 mx.test Error: too many errors\r\n"
        );
    }

    #[test]
    fn oversized_message_and_queue_failure() {
        let mut s = Session::new(cfg(), true);
        run(
            &mut s,
            &[
                ("EHLO c", "250"),
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<x@y.z>", "250"),
                ("DATA", "354"),
            ],
        );
        assert!(
            s.data_received(true)
                .unwrap_err()
                .to_string()
                .starts_with("552 5.3.4")
        );
        run(
            &mut s,
            &[
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<x@y.z>", "250"),
                ("DATA", "354"),
            ],
        );
        s.data_received(false).unwrap();
        assert!(
            s.queued(Err(QueueFailure::Unavailable))
                .to_string()
                .starts_with("451 4.3.0")
        );
        // The transaction is over: a new MAIL is accepted.
        run(&mut s, &[("MAIL FROM:<a@b.c>", "250")]);
    }

    #[test]
    fn line_reader_bounds_lines() {
        let mut r = LineReader::new(10);
        assert_eq!(
            r.next_line(b"NOOP\r\nQUIT"),
            Line::Complete {
                len: 4,
                consumed: 6
            }
        );
        assert_eq!(
            r.next_line(b"QUIT\n"),
            Line::Complete {
                len: 4,
                consumed: 5
            }
        );
        assert_eq!(r.next_line(b"QUI"), Line::NeedMore);
        assert_eq!(r.next_line(b"0123456789AB"), Line::TooLong { consumed: 12 });
        assert_eq!(r.next_line(b"more"), Line::NeedMore);
        assert_eq!(
            r.next_line(b"0123456789ABC"),
            Line::Discarded { consumed: 13 }
        );
        assert_eq!(
            r.next_line(b"tail\r\nNOOP\r\n"),
            Line::Discarded { consumed: 6 }
        );
        assert_eq!(
            r.next_line(b"NOOP\r\n"),
            Line::Complete {
                len: 4,
                consumed: 6
            }
        );
    }
}
