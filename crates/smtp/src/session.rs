//! The server side of an SMTP session as a state machine, with no IO.
//!
//! The driver reads command lines with [`LineReader`], gives each to
//! [`Session::command`] and acts on the [`Step`] it gets back. Steps that
//! need the outside world come back to the session: a local recipient is
//! checked by the driver ([`Session::recipient_checked`]), credentials too
//! ([`Session::credentials_checked`]), a message is queued
//! ([`Session::queued`]), TLS is started ([`Session::tls_started`]) and BDAT
//! chunks are read ([`Session::chunk_received`]). Everything else is decided
//! here, so the whole dialogue is tested without sockets.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::address::Address;
use crate::command::{Command, CommandError, MailParams, RcptParams, ReversePath, parse_command};
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
    /// Messages in one session before it is closed.
    pub max_transactions: usize,
    /// Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6:
    /// 1000); 0 for no limit.
    pub max_text_line: usize,
    /// Refuse messages with a bare CR or LF instead of storing it as CRLF.
    pub reject_bare_line_ends: bool,
    /// Most `Received:` fields a message may arrive with; more is a mail
    /// loop, refused with `554 5.4.6` (RFC 5321 §6.3).
    pub max_hops: usize,
}

impl SessionConfig {
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// The role of the listener a client connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Port 25: mail for local domains; relay only for trusted networks.
    Mx,
    /// Port 587 (RFC 6409): STARTTLS, then AUTH, before MAIL.
    Submission,
    /// Port 465 (RFC 8314): TLS from the first byte, then AUTH.
    Submissions,
}

/// How this connection may be served.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub role: Role,
    /// STARTTLS can be offered (a certificate is configured).
    pub tls_available: bool,
    /// TLS is already on (implicit TLS).
    pub tls_active: bool,
    /// AUTH can be offered (once TLS is on).
    pub auth_available: bool,
    /// The client's address is trusted to relay.
    pub relay_allowed: bool,
}

impl Policy {
    /// A plain MX listener without TLS or AUTH.
    pub fn mx(relay_allowed: bool) -> Policy {
        Policy {
            role: Role::Mx,
            tls_available: false,
            tls_active: false,
            auth_available: false,
            relay_allowed,
        }
    }
}

/// A password, kept out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
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
    /// Read exactly `size` octets of BDAT chunk (RFC 3030), then call
    /// [`Session::chunk_received`]. `first` starts a new message body.
    Chunk { size: u64, last: bool, first: bool },
    /// Send the reply, drop whatever the client sent after STARTTLS
    /// (RFC 3207 §4.2; CVE-2011-0411), do the TLS handshake, then call
    /// [`Session::tls_started`].
    StartTls(Reply),
    /// Check these credentials, then call [`Session::credentials_checked`].
    CheckCredentials { user: String, password: Secret },
}

/// The answer to [`Step::CheckRecipient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientVerdict {
    Exists,
    /// An alias that forwards to other domains (and to local mailboxes
    /// too, when `keep`).
    Forwards(Forward),
    Unknown,
    /// The mailbox is full (RFC 3463 4.2.2: worth trying later).
    OverQuota,
    /// The lookup could not be done now (storage unreachable, timeout).
    TryLater,
}

/// The answer to [`Step::CheckCredentials`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialVerdict {
    Valid,
    Invalid,
    TryLater,
}

/// One recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rcpt {
    pub address: Address,
    pub params: RcptParams,
    /// Where a local alias forwards it, when it does.
    pub forward: Option<Forward>,
}

/// A local alias's targets in other domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub targets: Vec<Address>,
    /// It leads to local mailboxes too: the address itself is delivered.
    pub keep: bool,
}

/// A complete envelope, handed out when the message is received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub helo: String,
    pub from: ReversePath,
    pub params: MailParams,
    pub recipients: Vec<Rcpt>,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPA` or `ESMTPSA` (RFC 3848).
    pub protocol: &'static str,
    /// The TLS version and cipher, when TLS is on.
    pub tls: Option<String>,
    /// The authenticated user, if any.
    pub user: Option<String>,
}

/// What follows a BDAT chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunked {
    Step(Step),
    /// The LAST chunk: queue the message, then call [`Session::queued`].
    Queue(Envelope),
}

/// How a message body arrived, checked by [`Session::data_received`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyReport {
    pub overflowed: bool,
    pub bare_line_ends: usize,
    pub longest_line: usize,
    /// `Received:` fields in its header section
    /// ([`crate::headers::received_count`]).
    pub hops: usize,
}

/// Why the queue did not take a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFailure {
    /// The queue is unreachable or did not confirm in time: `451 4.3.0`.
    Unavailable,
    /// Refused by inbound policy (DMARC, SPF), with its reply.
    Refused(Reply),
}

/// Where an AUTH exchange is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthStep {
    /// `334 ` sent for PLAIN; the response follows.
    Plain,
    /// `334 Username:` sent for LOGIN.
    LoginUser,
    /// `334 Password:` sent.
    LoginPassword(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before HELO/EHLO.
    Connected,
    /// After HELO/EHLO, no transaction.
    Ready,
    /// MAIL accepted; recipients may follow.
    Mail,
    /// BDAT chunks are coming.
    Bdat,
    /// DATA accepted; the driver is receiving the message.
    Data,
    /// The message is received; the driver is queuing it.
    Queuing,
    /// In an AUTH exchange: the next line is a response, not a command.
    Auth(AuthStep),
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    policy: Policy,
    state: State,
    esmtp: bool,
    tls: Option<String>,
    user: Option<String>,
    helo: String,
    from: ReversePath,
    params: MailParams,
    recipients: Vec<Rcpt>,
    errors: usize,
    transactions: usize,
    /// Set when a BDAT chunk is refused: the reply after it is read.
    chunk_refusal: Option<Reply>,
    /// DSN parameters of the RCPT being checked.
    pending_params: RcptParams,
}

fn reply(code: u16, e: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::new(code, Enhanced(e.0, e.1, e.2), text)
}

impl SessionConfig {
    /// `421 4.3.2`: the server is stopping (to a new connection or an idle
    /// session).
    pub fn shutting_down(&self) -> Reply {
        reply(
            421,
            (4, 3, 2),
            format!("{} Service shutting down, try again later", self.hostname),
        )
    }

    /// `421 4.3.2`: every connection slot is taken.
    pub fn too_many_connections(&self) -> Reply {
        reply(
            421,
            (4, 3, 2),
            format!("{} Too many connections, try again later", self.hostname),
        )
    }
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, policy: Policy) -> Self {
        Session {
            cfg,
            tls: policy.tls_active.then(|| "TLS".to_string()),
            policy,
            state: State::Connected,
            esmtp: false,
            user: None,
            helo: String::new(),
            from: ReversePath::Null,
            params: MailParams::default(),
            recipients: Vec::new(),
            errors: 0,
            transactions: 0,
            chunk_refusal: None,
            pending_params: RcptParams::default(),
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

    /// `421 4.4.2`: every connection slot was taken and this session had
    /// waited longest for its client, so it gives way to a new one.
    pub fn evicted(&self) -> Reply {
        reply(
            421,
            (4, 4, 2),
            format!(
                "{} Error: idle too long while the server is busy, closing",
                self.cfg.hostname
            ),
        )
    }

    /// `421 4.7.0`: the client's address failed to log in too often.
    pub fn too_many_failed_logins(&self) -> Reply {
        reply(
            421,
            (4, 7, 0),
            format!(
                "{} Error: too many failed logins from your address, try again later",
                self.cfg.hostname
            ),
        )
    }

    /// The reply given when a session has lasted longer than allowed.
    pub fn session_too_long(&self) -> Reply {
        reply(
            421,
            (4, 4, 2),
            format!("{} Error: session time limit exceeded", self.cfg.hostname),
        )
    }

    /// The reply given to new or idle sessions while the server stops.
    pub fn shutting_down(&self) -> Reply {
        self.cfg.shutting_down()
    }

    /// The reply to a client over its rate of connections or messages.
    pub fn rate_limited(&self, what: &str) -> Reply {
        reply(
            421,
            (4, 7, 0),
            format!("{} Error: too many {what}, slow down", self.cfg.hostname),
        )
    }

    /// The size MAIL FROM declared (SIZE=, RFC 1870); 0 when it did not.
    pub fn declared_size(&self) -> u64 {
        self.params.size.unwrap_or(0)
    }

    /// Recipients accepted so far in this transaction.
    pub fn recipients(&self) -> &[Rcpt] {
        &self.recipients
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn helo(&self) -> &str {
        &self.helo
    }

    /// Whether the next line belongs to an AUTH exchange (and must not be
    /// logged).
    pub fn in_auth(&self) -> bool {
        matches!(self.state, State::Auth(_))
    }

    fn relay_allowed(&self) -> bool {
        self.policy.relay_allowed || self.user.is_some()
    }

    fn reset(&mut self) {
        if self.state != State::Connected {
            self.state = State::Ready;
        }
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

    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPA`, `ESMTPSA` (RFC 3848).
    fn protocol(&self) -> &'static str {
        match (self.esmtp, self.tls.is_some(), self.user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }

    fn ehlo_lines(&self) -> Vec<String> {
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
            "DSN".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.policy.tls_available && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        // RFC 8689 §4.1: only in a session that is itself under TLS.
        if self.tls.is_some() {
            lines.push("REQUIRETLS".into());
        }
        // AUTH is never offered in the clear (RFC 8314 §3, RFC 4954 §4).
        if self.policy.auth_available && self.tls.is_some() && self.user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines
    }

    /// Handles one line (without CRLF): a command, or an AUTH response.
    pub fn command(&mut self, line: &[u8]) -> Step {
        debug_assert!(
            !matches!(self.state, State::Data | State::Queuing),
            "command while receiving a message"
        );
        if let State::Auth(step) = self.state.clone() {
            return self.auth_response(step, line);
        }
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
                Step::Reply(Reply::multi(250, None, self.ehlo_lines()))
            }
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
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
                    "Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT".into(),
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
            State::Mail | State::Bdat => {
                return self.error(reply(503, (5, 5, 1), "Error: nested MAIL command"));
            }
            _ => {}
        }
        if matches!(self.policy.role, Role::Submission | Role::Submissions) && self.user.is_none() {
            // RFC 3207 §4, RFC 4954 §6.
            let why = if self.tls.is_none() {
                "Must issue a STARTTLS command first"
            } else {
                "Authentication required"
            };
            return self.error(reply(530, (5, 7, 0), why));
        }
        if self.transactions >= self.cfg.max_transactions {
            return Step::Close(reply(
                421,
                (4, 7, 0),
                format!(
                    "{} Error: too many messages in one session",
                    self.cfg.hostname
                ),
            ));
        }
        if let Some(size) = params.size
            && size > self.cfg.max_message_size as u64
        {
            return self.error(reply(552, (5, 3, 4), "Message size exceeds fixed limit"));
        }
        if let ReversePath::Mailbox(a) = &from
            && a.is_utf8()
            && !params.smtputf8
        {
            return self.error(reply(
                553,
                (5, 6, 7),
                "Non-ASCII sender address needs SMTPUTF8",
            ));
        }
        if params.requiretls && self.tls.is_none() {
            // RFC 8689 §4.1: REQUIRETLS needs a TLS session to begin with.
            return self.error(reply(530, (5, 7, 10), "REQUIRETLS needs STARTTLS first"));
        }
        self.state = State::Mail;
        self.from = from;
        self.params = params;
        self.recipients.clear();
        Step::Reply(reply(250, (2, 1, 0), "Ok"))
    }

    fn rcpt(&mut self, to: Address, params: RcptParams) -> Step {
        if self.state != State::Mail {
            return self.error(reply(503, (5, 5, 1), "Error: need MAIL command"));
        }
        // `<Postmaster>` alone: this server's, at its first local domain.
        let to = match (to.is_bare_postmaster(), self.cfg.local_domains.first()) {
            (true, Some(domain)) => Address::postmaster_at(domain),
            _ => to,
        };
        if to.is_utf8() && !self.params.smtputf8 {
            return self.error(reply(
                553,
                (5, 6, 7),
                "Non-ASCII recipient address needs SMTPUTF8",
            ));
        }
        if self.recipients.iter().any(|r| r.address == to) {
            // A repeated recipient gets one copy (RFC 5321 §3.3 allows this).
            return Step::Reply(reply(250, (2, 1, 5), "Ok"));
        }
        if self.recipients.len() >= self.cfg.max_recipients {
            return self.error(reply(452, (4, 5, 3), "Error: too many recipients"));
        }
        self.pending_params = params;
        if self.cfg.is_local_domain(to.domain()) {
            return Step::CheckRecipient(to);
        }
        if !self.relay_allowed() {
            return self.error(reply(
                550,
                (5, 7, 1),
                format!("<{to}>: Relay access denied"),
            ));
        }
        let params = std::mem::take(&mut self.pending_params);
        self.recipients.push(Rcpt {
            address: to,
            params,
            forward: None,
        });
        Step::Reply(reply(250, (2, 1, 5), "Ok"))
    }

    /// The driver's answer to [`Step::CheckRecipient`].
    pub fn recipient_checked(&mut self, to: Address, verdict: RecipientVerdict) -> Step {
        let params = std::mem::take(&mut self.pending_params);
        match verdict {
            RecipientVerdict::Exists => {
                self.recipients.push(Rcpt {
                    address: to,
                    params,
                    forward: None,
                });
                Step::Reply(reply(250, (2, 1, 5), "Ok"))
            }
            RecipientVerdict::Forwards(f) => {
                self.recipients.push(Rcpt {
                    address: to,
                    params,
                    forward: Some(f),
                });
                Step::Reply(reply(250, (2, 1, 5), "Ok"))
            }
            RecipientVerdict::Unknown => self.error(reply(
                550,
                (5, 1, 1),
                format!("<{to}>: Recipient address rejected: User unknown"),
            )),
            RecipientVerdict::OverQuota => self.error(reply(
                452,
                (4, 2, 2),
                format!("<{to}>: Recipient address rejected: Mailbox full"),
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
            State::Bdat => self.error(reply(503, (5, 5, 1), "Error: DATA after BDAT")),
            _ => self.error(reply(503, (5, 5, 1), "Error: need MAIL command")),
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Step {
        let first = self.state == State::Mail;
        self.chunk_refusal = match self.state {
            State::Mail if !self.recipients.is_empty() => {
                self.state = State::Bdat;
                None
            }
            State::Bdat => None,
            State::Mail => Some(reply(503, (5, 5, 1), "Error: need RCPT command")),
            _ => Some(reply(503, (5, 5, 1), "Error: need MAIL command")),
        };
        // The chunk is read (and dropped) even when refused: the client
        // sends it regardless (RFC 3030 §3).
        Step::Chunk { size, last, first }
    }

    /// A BDAT chunk was read; `total` octets of message so far, and after
    /// the LAST chunk what the whole message holds. Returns the step to
    /// take, or (after the LAST chunk) the envelope to queue.
    pub fn chunk_received(&mut self, total: u64, last: Option<BodyReport>) -> Chunked {
        if let Some(r) = self.chunk_refusal.take() {
            return Chunked::Step(self.error(r));
        }
        if total > self.cfg.max_message_size as u64 {
            self.reset();
            return Chunked::Step(self.error(reply(
                552,
                (5, 3, 4),
                "Message size exceeds fixed limit",
            )));
        }
        let Some(body) = last else {
            return Chunked::Step(Step::Reply(reply(
                250,
                (2, 0, 0),
                format!("{total} octets received"),
            )));
        };
        if let Some(r) = self.refusal(&body) {
            self.reset();
            return Chunked::Step(self.error(r));
        }
        self.state = State::Queuing;
        Chunked::Queue(self.envelope())
    }

    fn envelope(&mut self) -> Envelope {
        self.transactions += 1;
        Envelope {
            helo: self.helo.clone(),
            from: self.from.clone(),
            params: self.params.clone(),
            recipients: self.recipients.clone(),
            protocol: self.protocol(),
            tls: self.tls.clone(),
            user: self.user.clone(),
        }
    }

    /// The message after `354` was received. Returns the envelope to queue,
    /// or the reply to send.
    pub fn data_received(&mut self, body: BodyReport) -> Result<Envelope, Reply> {
        debug_assert_eq!(self.state, State::Data);
        if let Some(r) = self.refusal(&body) {
            self.reset();
            return Err(r);
        }
        self.state = State::Queuing;
        Ok(self.envelope())
    }

    /// Why a whole message is refused, if it is.
    fn refusal(&self, body: &BodyReport) -> Option<Reply> {
        if body.overflowed {
            Some(reply(552, (5, 3, 4), "Message size exceeds fixed limit"))
        } else if self.cfg.reject_bare_line_ends && body.bare_line_ends > 0 {
            Some(reply(550, (5, 5, 2), "Error: bare <CR> or <LF> received"))
        } else if self.cfg.max_text_line > 0 && body.longest_line > self.cfg.max_text_line {
            Some(reply(
                500,
                (5, 5, 2),
                "Error: line too long (RFC 5321 §4.5.3.1.6)",
            ))
        } else if body.hops > self.cfg.max_hops {
            Some(reply(
                554,
                (5, 4, 6),
                format!(
                    "Error: too many hops ({} Received: fields; a mail loop?)",
                    body.hops
                ),
            ))
        } else {
            None
        }
    }

    /// The outcome of queuing the message: `Ok(queue id)` or why not.
    pub fn queued(&mut self, outcome: Result<&str, QueueFailure>) -> Reply {
        self.reset();
        match outcome {
            Ok(id) => reply(250, (2, 0, 0), format!("Ok: queued as {id}")),
            Err(QueueFailure::Unavailable) => {
                reply(451, (4, 3, 0), "Error: queue unavailable, try again later")
            }
            Err(QueueFailure::Refused(r)) => r,
        }
    }

    fn starttls(&mut self) -> Step {
        if !self.policy.tls_available {
            return self.error(reply(502, (5, 5, 1), "Error: command not implemented"));
        }
        if self.tls.is_some() {
            return self.error(reply(503, (5, 5, 1), "Error: TLS already active"));
        }
        match self.state {
            State::Connected => self.error(reply(503, (5, 5, 1), "Error: send EHLO first")),
            State::Ready => Step::StartTls(reply(220, (2, 0, 0), "Ready to start TLS")),
            _ => self.error(reply(503, (5, 5, 1), "Error: MAIL transaction in progress")),
        }
    }

    /// TLS is up. The client starts over with EHLO (RFC 3207 §4.2).
    pub fn tls_started(&mut self, description: String) {
        self.tls = Some(description);
        self.state = State::Connected;
        self.esmtp = false;
        self.helo.clear();
        self.reset();
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Step {
        if !self.policy.auth_available {
            return self.error(reply(503, (5, 5, 1), "Error: authentication not enabled"));
        }
        if self.tls.is_none() {
            return self.error(reply(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.user.is_some() {
            return self.error(reply(503, (5, 5, 1), "Error: already authenticated"));
        }
        if self.state != State::Ready {
            let why = if self.state == State::Connected {
                "send EHLO first"
            } else {
                "MAIL transaction in progress"
            };
            return self.error(reply(503, (5, 5, 1), format!("Error: {why}")));
        }
        match (mechanism, initial) {
            ("PLAIN", None) => {
                self.state = State::Auth(AuthStep::Plain);
                Step::Reply(Reply::plain(334, ""))
            }
            ("PLAIN", Some(resp)) => self.auth_response(AuthStep::Plain, resp.as_bytes()),
            ("LOGIN", None) => {
                self.state = State::Auth(AuthStep::LoginUser);
                Step::Reply(Reply::plain(334, BASE64.encode("Username:")))
            }
            ("LOGIN", Some(resp)) => self.auth_response(AuthStep::LoginUser, resp.as_bytes()),
            _ => self.error(reply(504, (5, 5, 4), "Unrecognized authentication type")),
        }
    }

    fn auth_response(&mut self, step: AuthStep, line: &[u8]) -> Step {
        self.state = State::Ready;
        if line == b"*" {
            return self.error(reply(501, (5, 0, 0), "Authentication cancelled"));
        }
        // RFC 4954 §4: "=" is an empty initial response.
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            BASE64.decode(line)
        };
        let Ok(decoded) = decoded else {
            return self.error(reply(501, (5, 5, 2), "Invalid base64 data"));
        };
        match step {
            AuthStep::Plain => {
                // authzid NUL authcid NUL passwd (RFC 4616).
                let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
                let [authz, user, pass] = parts.as_slice() else {
                    return self.error(reply(501, (5, 5, 2), "Malformed PLAIN response"));
                };
                let (Ok(authz), Ok(user), Ok(pass)) = (
                    std::str::from_utf8(authz),
                    std::str::from_utf8(user),
                    std::str::from_utf8(pass),
                ) else {
                    return self.error(reply(501, (5, 5, 2), "Credentials are not UTF-8"));
                };
                if !authz.is_empty() && authz != user {
                    return self.error(reply(535, (5, 7, 8), "Authentication credentials invalid"));
                }
                Step::CheckCredentials {
                    user: user.to_string(),
                    password: Secret(pass.to_string()),
                }
            }
            AuthStep::LoginUser => match String::from_utf8(decoded) {
                Ok(user) => {
                    self.state = State::Auth(AuthStep::LoginPassword(user));
                    Step::Reply(Reply::plain(334, BASE64.encode("Password:")))
                }
                Err(_) => self.error(reply(501, (5, 5, 2), "Credentials are not UTF-8")),
            },
            AuthStep::LoginPassword(user) => match String::from_utf8(decoded) {
                Ok(pass) => Step::CheckCredentials {
                    user,
                    password: Secret(pass),
                },
                Err(_) => self.error(reply(501, (5, 5, 2), "Credentials are not UTF-8")),
            },
        }
    }

    /// The driver's answer to [`Step::CheckCredentials`].
    pub fn credentials_checked(&mut self, user: String, verdict: CredentialVerdict) -> Step {
        match verdict {
            CredentialVerdict::Valid => {
                self.user = Some(user);
                Step::Reply(reply(235, (2, 7, 0), "Authentication successful"))
            }
            CredentialVerdict::Invalid => {
                self.error(reply(535, (5, 7, 8), "Authentication credentials invalid"))
            }
            CredentialVerdict::TryLater => {
                self.error(reply(454, (4, 7, 0), "Temporary authentication failure"))
            }
        }
    }

    /// Whether the client said EHLO (and may use the extensions).
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
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
            max_transactions: 3,
            max_text_line: 1000,
            reject_bare_line_ends: false,
            max_hops: 3,
        })
    }

    fn text(step: &Step) -> String {
        match step {
            Step::Reply(r) | Step::Close(r) | Step::Data(r) => {
                String::from_utf8(r.to_bytes()).unwrap()
            }
            Step::CheckRecipient(a) => format!("check {a}"),
            Step::Chunk { size, last, first } => format!("chunk {size} {last} {first}"),
            Step::StartTls(r) => format!("starttls {}", String::from_utf8(r.to_bytes()).unwrap()),
            Step::CheckCredentials { user, password } => {
                format!("credentials {user} {}", password.0)
            }
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
    fn postmaster_without_a_domain_is_this_servers() {
        let mut s = Session::new(cfg(), Policy::mx(false));
        s.command(b"EHLO client.example");
        s.command(b"MAIL FROM:<jo@elsewhere.example>");
        assert_eq!(
            text(&s.command(b"RCPT TO:<Postmaster>")),
            "check postmaster@localhost"
        );
    }

    #[test]
    fn seed_session() {
        let mut s = Session::new(cfg(), Policy::mx(false));
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
        let env = s.data_received(BodyReport::default()).unwrap();
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
        let mut s = Session::new(cfg(), Policy::mx(false));
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
                ("STARTTLS", "502 5.5.1"),
                ("AUTH PLAIN", "503 5.5.1"),
            ],
        );
    }

    #[test]
    fn trusted_client_may_relay_up_to_the_recipient_limit() {
        let mut s = Session::new(cfg(), Policy::mx(true));
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
        let mut s = Session::new(cfg(), Policy::mx(false));
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
        let mut s = Session::new(strict, Policy::mx(false));
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
        let mut s = Session::new(cfg(), Policy::mx(true));
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
            s.data_received(BodyReport {
                overflowed: true,
                ..BodyReport::default()
            })
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
        s.data_received(BodyReport::default()).unwrap();
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

    fn tls_policy(role: Role) -> Policy {
        Policy {
            role,
            tls_available: true,
            tls_active: role == Role::Submissions,
            auth_available: role != Role::Mx,
            relay_allowed: false,
        }
    }

    #[test]
    fn starttls_then_ehlo_again_and_no_auth_in_the_clear() {
        let mut s = Session::new(cfg(), tls_policy(Role::Submission));
        run(&mut s, &[("STARTTLS", "503 5.5.1")]);
        let ehlo = text(&s.command(b"EHLO c"));
        assert!(
            ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        run(
            &mut s,
            &[
                ("AUTH PLAIN AGpvAHNlY3JldA==", "538 5.7.11"),
                (
                    "MAIL FROM:<jo@domini.com>",
                    "530 5.7.0 Must issue a STARTTLS command first",
                ),
                ("STARTTLS", "starttls 220 2.0.0"),
            ],
        );
        s.tls_started("TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256".into());
        // The old EHLO is forgotten (RFC 3207 §4.2).
        run(
            &mut s,
            &[(
                "MAIL FROM:<jo@domini.com>",
                "503 5.5.1 Error: send HELO/EHLO first",
            )],
        );
        let ehlo = text(&s.command(b"EHLO c"));
        assert!(
            !ehlo.contains("STARTTLS") && ehlo.contains("AUTH PLAIN LOGIN"),
            "{ehlo}"
        );
        run(
            &mut s,
            &[
                ("STARTTLS", "503 5.5.1 Error: TLS already active"),
                (
                    "MAIL FROM:<jo@domini.com>",
                    "530 5.7.0 Authentication required",
                ),
                ("AUTH PLAIN AGpvAHNlY3JldA==", "credentials jo secret"),
            ],
        );
        assert_eq!(
            text(&s.credentials_checked("jo".into(), CredentialVerdict::Valid)),
            "235 2.7.0 Authentication successful\r\n"
        );
        run(
            &mut s,
            &[
                ("AUTH PLAIN AGpvAHNlY3JldA==", "503 5.5.1"),
                ("MAIL FROM:<jo@domini.com>", "250 2.1.0"),
                // Authenticated users may relay.
                ("RCPT TO:<ana@elsewhere.org>", "250 2.1.5"),
                ("DATA", "354"),
            ],
        );
        let env = s.data_received(BodyReport::default()).unwrap();
        assert_eq!(env.protocol, "ESMTPSA");
        assert_eq!(env.user.as_deref(), Some("jo"));
        assert!(env.tls.unwrap().starts_with("TLSv1.3"));
    }

    #[test]
    fn auth_login_and_failures() {
        let mut s = Session::new(cfg(), tls_policy(Role::Submissions));
        run(
            &mut s,
            &[
                ("EHLO c", "250-"),
                ("AUTH CRAM-MD5", "504 5.5.4"),
                ("AUTH LOGIN", "334 VXNlcm5hbWU6"),
                ("am8=", "334 UGFzc3dvcmQ6"),
                ("c2VjcmV0", "credentials jo secret"),
            ],
        );
        assert!(
            text(&s.credentials_checked("jo".into(), CredentialVerdict::Invalid))
                .starts_with("535 5.7.8")
        );
        run(
            &mut s,
            &[
                ("AUTH LOGIN", "334"),
                ("*", "501 5.0.0"),
                ("AUTH PLAIN", "334 "),
                ("not base64!", "501 5.5.2"),
            ],
        );
        run(
            &mut s,
            &[("AUTH PLAIN", "334 "), ("AGpv", "501 5.5.2 Malformed")],
        );
        // Another identity than the one authenticated: refused.
        run(&mut s, &[("AUTH PLAIN YW5uYQBqbwBzZWNyZXQ=", "535 5.7.8")]);
        run(
            &mut s,
            &[("AUTH PLAIN AGpvAHNlY3JldA==", "credentials jo secret")],
        );
        assert!(
            text(&s.credentials_checked("jo".into(), CredentialVerdict::TryLater))
                .starts_with("454 4.7.0")
        );
        assert!(s.user().is_none());
        // The MX role offers no AUTH at all.
        let mut mx = Session::new(cfg(), tls_policy(Role::Mx));
        mx.tls_started("TLS".into());
        assert!(!text(&mx.command(b"EHLO c")).contains("AUTH"));
        run(&mut mx, &[("AUTH PLAIN AGpvAHNlY3JldA==", "503 5.5.1")]);
    }

    #[test]
    fn bdat_chunks_and_their_errors() {
        let mut s = Session::new(cfg(), Policy::mx(true));
        run(
            &mut s,
            &[("EHLO c", "250-"), ("BDAT 10", "chunk 10 false false")],
        );
        assert!(
            matches!(s.chunk_received(10, None), Chunked::Step(Step::Reply(r)) if r.code == 503)
        );
        run(
            &mut s,
            &[
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<x@y.z> NOTIFY=FAILURE ORCPT=rfc822;x@y.z", "250"),
                ("BDAT 10", "chunk 10 false true"),
            ],
        );
        assert_eq!(
            text(&match s.chunk_received(10, None) {
                Chunked::Step(st) => st,
                Chunked::Queue(_) => panic!(),
            }),
            "250 2.0.0 10 octets received\r\n"
        );
        run(
            &mut s,
            &[
                ("DATA", "503 5.5.1"),
                ("MAIL FROM:<a@b.c>", "503 5.5.1"),
                ("BDAT 5 LAST", "chunk 5 true false"),
            ],
        );
        let Chunked::Queue(env) = s.chunk_received(15, Some(BodyReport::default())) else {
            panic!("queue")
        };
        assert_eq!(env.recipients[0].params.notify.as_deref(), Some("FAILURE"));
        assert_eq!(
            env.recipients[0].params.orcpt.as_deref(),
            Some("rfc822;x@y.z")
        );
        s.queued(Ok("ID"));
        run(
            &mut s,
            &[
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<x@y.z>", "250"),
                ("BDAT 2000 LAST", "chunk 2000 true true"),
            ],
        );
        assert!(
            matches!(s.chunk_received(2000, Some(BodyReport::default())), Chunked::Step(Step::Reply(r)) if r.code == 552)
        );
        // The same hop limit as DATA, and the session goes on.
        run(
            &mut s,
            &[
                ("MAIL FROM:<a@b.c>", "250"),
                ("RCPT TO:<x@y.z>", "250"),
                ("BDAT 20 LAST", "chunk 20 true true"),
            ],
        );
        let hops = BodyReport {
            hops: 4,
            ..BodyReport::default()
        };
        assert!(
            matches!(s.chunk_received(20, Some(hops)), Chunked::Step(Step::Reply(r)) if r.to_string().starts_with("554 5.4.6"))
        );
        run(&mut s, &[("MAIL FROM:<a@b.c>", "250")]);
    }

    #[test]
    fn smtputf8_is_needed_for_utf8_addresses() {
        let mut s = Session::new(cfg(), Policy::mx(true));
        run(
            &mut s,
            &[
                ("EHLO c", "250-"),
                ("MAIL FROM:<josé@exemple.cat>", "553 5.6.7"),
                ("MAIL FROM:<jo@domini.com>", "250"),
                ("RCPT TO:<ànna@exemple.cat>", "553 5.6.7"),
                ("RSET", "250"),
                ("MAIL FROM:<josé@exemple.cat> SMTPUTF8", "250"),
                ("RCPT TO:<ànna@exemple.cat>", "250"),
            ],
        );
    }

    #[test]
    fn requiretls_is_offered_and_taken_only_under_tls() {
        let mut plain = Session::new(cfg(), Policy::mx(true));
        let ehlo = text(&plain.command(b"EHLO c"));
        assert!(!ehlo.contains("REQUIRETLS"), "{ehlo}");
        run(
            &mut plain,
            &[("MAIL FROM:<jo@domini.com> REQUIRETLS", "530 5.7.10")],
        );
        let mut tls = Session::new(
            cfg(),
            Policy {
                tls_active: true,
                ..Policy::mx(true)
            },
        );
        let ehlo = text(&tls.command(b"EHLO c"));
        assert!(ehlo.contains("REQUIRETLS"), "{ehlo}");
        run(&mut tls, &[("MAIL FROM:<jo@domini.com> REQUIRETLS", "250")]);
        assert!(tls.params.requiretls);
    }

    #[test]
    fn message_checks_and_transaction_limit() {
        let strict = Arc::new(SessionConfig {
            reject_bare_line_ends: true,
            ..(*cfg()).clone()
        });
        let mut s = Session::new(strict, Policy::mx(true));
        let send = |s: &mut Session, body: BodyReport| {
            run(
                s,
                &[
                    ("MAIL FROM:<a@b.c>", "250"),
                    ("RCPT TO:<x@y.z>", "250"),
                    ("DATA", "354"),
                ],
            );
            s.data_received(body)
        };
        run(&mut s, &[("EHLO c", "250")]);
        assert!(
            send(
                &mut s,
                BodyReport {
                    bare_line_ends: 1,
                    ..BodyReport::default()
                }
            )
            .unwrap_err()
            .to_string()
            .starts_with("550 5.5.2")
        );
        assert!(
            send(
                &mut s,
                BodyReport {
                    longest_line: 1001,
                    ..BodyReport::default()
                }
            )
            .unwrap_err()
            .to_string()
            .starts_with("500 5.5.2")
        );
        // A mail loop: more Received: fields than max_hops (3 here).
        let looped = send(
            &mut s,
            BodyReport {
                hops: 4,
                ..BodyReport::default()
            },
        )
        .unwrap_err();
        assert_eq!(looped.code, 554);
        assert!(looped.to_string().starts_with("554 5.4.6"), "{looped}");
        // Refused messages are not transactions: three more fit.
        for _ in 0..3 {
            send(&mut s, BodyReport::default()).unwrap();
            s.queued(Ok("ID"));
        }
        assert!(
            matches!(s.command(b"MAIL FROM:<a@b.c>"), Step::Close(r) if r.to_string().starts_with("421 4.7.0"))
        );
    }
}
