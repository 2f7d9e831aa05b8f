//! SMTP commands (RFC 5321 §4.1.1) parsed from one line without its CRLF.

use crate::address::{Address, AddressError};

/// The reverse-path of MAIL FROM: a mailbox, or `<>` for bounces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Address),
}

impl ReversePath {
    /// The address as text, empty for the null path.
    pub fn as_string(&self) -> String {
        match self {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        }
    }
}

/// BODY= of MAIL FROM (RFC 6152).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// The parameters of MAIL FROM that Correu honours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// SIZE= (RFC 1870): the client's estimate of the message size.
    pub size: Option<u64>,
    pub body: Option<Body>,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// RET= (RFC 3461 §4.3): what a bounce returns of the message.
    pub ret: Option<Ret>,
    /// ENVID= (RFC 3461 §4.4), as sent (xtext).
    pub envid: Option<String>,
    /// REQUIRETLS (RFC 8689): relay only over verified TLS, else bounce.
    pub requiretls: bool,
}

/// RET= of MAIL FROM (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

/// The DSN parameters of RCPT TO (RFC 3461 §4.1, §4.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// NOTIFY=, normalised: `NEVER`, or some of `SUCCESS,FAILURE,DELAY`.
    pub notify: Option<String>,
    /// ORCPT=, as sent: `addr-type;xtext`.
    pub orcpt: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// HELO, with the name as given (possibly empty: some clients send none).
    Helo(String),
    Ehlo(String),
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        to: Address,
        params: RcptParams,
    },
    Data,
    /// BDAT (RFC 3030): a chunk of `size` octets follows the command line.
    Bdat {
        size: u64,
        last: bool,
    },
    StartTls,
    /// AUTH (RFC 4954) with the mechanism upper-cased and the optional
    /// initial response.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    Rset,
    Noop,
    Vrfy(String),
    Help(String),
    Quit,
}

/// Why a line is not a command Correu can act on; each maps to one reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// `500 5.5.2`: not a command at all.
    #[error("command not recognized")]
    Unrecognized,
    /// `500 5.5.2`: the line is not UTF-8.
    #[error("command is not valid UTF-8")]
    NotUtf8,
    /// `501 5.5.4`: a known command with bad syntax; the text says what is expected.
    #[error("syntax: {0}")]
    Syntax(&'static str),
    /// `501 5.1.7`: the sender's address is not valid.
    #[error("bad sender address: {0}")]
    Sender(AddressError),
    /// `501 5.1.3`: the recipient's address is not valid.
    #[error("bad recipient address: {0}")]
    Recipient(AddressError),
    /// `555 5.5.4`: MAIL or RCPT parameter not recognised or not implemented.
    #[error("parameter not supported: {0}")]
    Parameter(String),
    /// `504 5.5.4`: a parameter with a value Correu cannot accept.
    #[error("bad parameter value: {0}")]
    ParameterValue(String),
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    if verb.len() > 8 {
        return Err(CommandError::Unrecognized);
    }
    let verb = verb.to_ascii_uppercase();
    let arg = rest.trim_matches(' ');
    match verb.as_str() {
        "HELO" => Ok(Command::Helo(helo_name(arg)?)),
        "EHLO" => {
            if arg.is_empty() {
                return Err(CommandError::Syntax("EHLO hostname"));
            }
            Ok(Command::Ehlo(helo_name(arg)?))
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_arg(arg, Command::Data, "DATA"),
        "RSET" => no_arg(arg, Command::Rset, "RSET"),
        // NOOP may carry a string, which is ignored (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_arg(arg, Command::Quit, "QUIT"),
        "BDAT" => parse_bdat(arg),
        "STARTTLS" => no_arg(arg, Command::StartTls, "STARTTLS"),
        "AUTH" => {
            let mut parts = arg.split(' ').filter(|p| !p.is_empty());
            let mechanism = parts
                .next()
                .ok_or(CommandError::Syntax("AUTH mechanism [initial-response]"))?
                .to_ascii_uppercase();
            let initial = parts.next().map(str::to_string);
            if parts.next().is_some() {
                return Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "VRFY" => {
            if arg.is_empty() {
                return Err(CommandError::Syntax("VRFY address"));
            }
            Ok(Command::Vrfy(arg.to_string()))
        }
        "HELP" => Ok(Command::Help(arg.to_string())),
        _ => Err(CommandError::Unrecognized),
    }
}

/// The name a client gives in HELO or EHLO. It goes into `Received:`, so
/// a control character (a bare CR, NUL, TAB) or white space inside it is
/// refused: after a relay hop a CR would start a header line of the
/// client's choosing.
fn helo_name(arg: &str) -> Result<String, CommandError> {
    if arg
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == '\u{7f}')
    {
        return Err(CommandError::Syntax(
            "HELO/EHLO hostname, without spaces or control characters",
        ));
    }
    Ok(arg.to_string())
}

fn no_arg(arg: &str, cmd: Command, usage: &'static str) -> Result<Command, CommandError> {
    if arg.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax(usage))
    }
}

/// Strips `prefix` (like `FROM:`) case-insensitively.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits `<path> params` or, as many clients send, `path params` without
/// brackets. Returns the path's inside and the rest.
fn split_path(s: &str) -> Result<(&str, &str), CommandError> {
    let s = s.trim_start_matches(' ');
    if let Some(inner) = s.strip_prefix('<') {
        // Find the closing bracket outside any quoted string.
        let mut quoted = false;
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '>' if !quoted => return Ok((&inner[..i], &inner[i + 1..])),
                _ => {}
            }
        }
        return Err(CommandError::Syntax("path is missing its closing '>'"));
    }
    Ok(match s.find(' ') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    })
}

/// Drops an obsolete source route `@a,@b:` (RFC 5321 §4.1.2, §C).
fn strip_source_route(path: &str) -> &str {
    if path.starts_with('@')
        && let Some(i) = path.find(':')
    {
        return &path[i + 1..];
    }
    path
}

fn params(rest: &str) -> Result<Vec<(String, Option<&str>)>, CommandError> {
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(CommandError::Syntax(
            "parameters must follow the path after a space",
        ));
    }
    Ok(rest
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (p.to_ascii_uppercase(), None),
        })
        .collect())
}

fn parse_mail(rest: &str) -> Result<Command, CommandError> {
    let rest = strip_prefix_ci(rest, "FROM:").ok_or(CommandError::Syntax("MAIL FROM:<address>"))?;
    let (path, rest) = split_path(rest)?;
    let from = if path.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Mailbox(
            Address::parse(strip_source_route(path)).map_err(CommandError::Sender)?,
        )
    };
    let mut p = MailParams::default();
    for (key, value) in params(rest)? {
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                let n = v
                    .parse()
                    .map_err(|_| CommandError::ParameterValue(format!("SIZE={v}")))?;
                p.size = Some(n);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => p.body = Some(Body::SevenBit),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                p.body = Some(Body::EightBitMime)
            }
            ("BODY", Some(v)) => return Err(CommandError::ParameterValue(format!("BODY={v}"))),
            ("SMTPUTF8", None) => p.smtputf8 = true,
            ("REQUIRETLS", None) => p.requiretls = true,
            ("RET", Some(v)) if v.eq_ignore_ascii_case("FULL") => p.ret = Some(Ret::Full),
            ("RET", Some(v)) if v.eq_ignore_ascii_case("HDRS") => p.ret = Some(Ret::Headers),
            ("RET", Some(v)) => return Err(CommandError::ParameterValue(format!("RET={v}"))),
            // RFC 3461 §4.4: at most 100 characters of xtext, which may not
            // decode to control characters (the DSN writes it as a field).
            ("ENVID", Some(v)) if v.len() <= 100 && is_xtext(v) && decodes_clean(v) => {
                p.envid = Some(v.to_string())
            }
            ("ENVID", Some(v)) => return Err(CommandError::ParameterValue(format!("ENVID={v}"))),
            (k, _) => return Err(CommandError::Parameter(k.to_string())),
        }
    }
    Ok(Command::Mail { from, params: p })
}

/// Decodes xtext (RFC 3461 §4): `+XX` is the octet XX; anything else is
/// itself. Lenient: a `+` without two hex digits stays a `+`.
pub fn decode_xtext(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes text as xtext (RFC 3461 §4): `+`, `=`, controls, spaces and
/// non-ASCII octets as `+XX`.
pub fn encode_xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Whether xtext decodes to text without control characters (`+0D+0A`
/// would let the client write header lines into a DSN).
fn decodes_clean(v: &str) -> bool {
    !decode_xtext(v).chars().any(|c| c.is_control())
}

/// xtext (RFC 3461 §4): printable ASCII but `+` and `=`, with `+XX` escapes.
fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if !(b.get(i + 1).copied().is_some_and(hex)
                    && b.get(i + 2).copied().is_some_and(hex))
                {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

fn parse_notify(v: &str) -> Result<String, CommandError> {
    let bad = || CommandError::ParameterValue(format!("NOTIFY={v}"));
    let words: Vec<String> = v.split(',').map(|w| w.to_ascii_uppercase()).collect();
    if words.iter().any(|w| w == "NEVER") {
        return if words.len() == 1 {
            Ok("NEVER".into())
        } else {
            Err(bad())
        };
    }
    let mut out = Vec::new();
    for want in ["SUCCESS", "FAILURE", "DELAY"] {
        if words.iter().any(|w| w == want) {
            out.push(want);
        }
    }
    if out.is_empty() || out.len() != words.len() {
        return Err(bad());
    }
    Ok(out.join(","))
}

fn parse_bdat(arg: &str) -> Result<Command, CommandError> {
    let mut parts = arg.split(' ').filter(|p| !p.is_empty());
    let size = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(CommandError::Syntax("BDAT size [LAST]"))?;
    let last = match parts.next() {
        None => false,
        Some(l) if l.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax("BDAT size [LAST]")),
    };
    if parts.next().is_some() {
        return Err(CommandError::Syntax("BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_rcpt(rest: &str) -> Result<Command, CommandError> {
    let rest = strip_prefix_ci(rest, "TO:").ok_or(CommandError::Syntax("RCPT TO:<address>"))?;
    let (path, rest) = split_path(rest)?;
    if path.is_empty() {
        return Err(CommandError::Syntax("RCPT TO:<address>"));
    }
    let path = strip_source_route(path);
    // "Postmaster" alone names the postmaster of this server (RFC 5321
    // §4.1.1.3, §4.5.1); the session gives it its first local domain.
    let to = if path.eq_ignore_ascii_case("postmaster") {
        Address::bare_postmaster()
    } else {
        Address::parse(path).map_err(CommandError::Recipient)?
    };
    let mut p = RcptParams::default();
    for (key, value) in params(rest)? {
        match (key.as_str(), value) {
            ("NOTIFY", Some(v)) => p.notify = Some(parse_notify(v)?),
            // addr-type ";" xtext (RFC 3461 §4.2); the address may be UTF-8
            // with SMTPUTF8 (RFC 6533), so only the shape is checked here.
            ("ORCPT", Some(v)) if v.contains(';') && v.len() <= 500 && decodes_clean(v) => {
                p.orcpt = Some(v.to_string())
            }
            ("ORCPT", Some(v)) => return Err(CommandError::ParameterValue(format!("ORCPT={v}"))),
            (k, _) => return Err(CommandError::Parameter(k.to_string())),
        }
    }
    Ok(Command::Rcpt { to, params: p })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    #[test]
    fn xtext_encodes_what_it_must_and_decodes_back() {
        for text in [
            "mix@fwd.test",
            "a+b=c@x.test",
            "jo smith@x.test",
            "\u{e0}@x.test",
        ] {
            let x = encode_xtext(text);
            assert!(is_xtext(&x), "{x}");
            assert_eq!(decode_xtext(&x), text);
        }
        assert_eq!(encode_xtext("a+b=c@x"), "a+2Bb+3Dc@x");
    }

    #[test]
    fn parses_commands_table() {
        let cases: Vec<(&str, Command)> = vec![
            ("HELO", Command::Helo(String::new())),
            (
                "helo client.example",
                Command::Helo("client.example".into()),
            ),
            (
                "EHLO client.example",
                Command::Ehlo("client.example".into()),
            ),
            ("ehlo [127.0.0.1]", Command::Ehlo("[127.0.0.1]".into())),
            (
                "MAIL FROM: jo@domini.com",
                Command::Mail {
                    from: ReversePath::Mailbox(addr("jo@domini.com")),
                    params: MailParams::default(),
                },
            ),
            (
                "mail from:<jo@domini.com> SIZE=1000 BODY=8BITMIME",
                Command::Mail {
                    from: ReversePath::Mailbox(addr("jo@domini.com")),
                    params: MailParams {
                        size: Some(1000),
                        body: Some(Body::EightBitMime),
                        ..MailParams::default()
                    },
                },
            ),
            (
                "MAIL FROM:<>",
                Command::Mail {
                    from: ReversePath::Null,
                    params: MailParams::default(),
                },
            ),
            (
                "MAIL FROM:<josé@exemple.cat> SMTPUTF8",
                Command::Mail {
                    from: ReversePath::Mailbox(addr("josé@exemple.cat")),
                    params: MailParams {
                        smtputf8: true,
                        ..MailParams::default()
                    },
                },
            ),
            (
                "RCPT TO: pere@localhost",
                Command::Rcpt {
                    to: addr("pere@localhost"),
                    params: RcptParams::default(),
                },
            ),
            (
                "RCPT TO:<@relay.example:pere@localhost>",
                Command::Rcpt {
                    to: addr("pere@localhost"),
                    params: RcptParams::default(),
                },
            ),
            (
                "RCPT TO:<\"a>b\"@localhost>",
                Command::Rcpt {
                    to: addr("\"a>b\"@localhost"),
                    params: RcptParams::default(),
                },
            ),
            (
                "RCPT TO:<a@x.org> NOTIFY=delay,failure ORCPT=rfc822;a+40x.org",
                Command::Rcpt {
                    to: addr("a@x.org"),
                    params: RcptParams {
                        notify: Some("FAILURE,DELAY".into()),
                        orcpt: Some("rfc822;a+40x.org".into()),
                    },
                },
            ),
            (
                "MAIL FROM:<a@x.org> RET=HDRS ENVID=QQ+2B1",
                Command::Mail {
                    from: ReversePath::Mailbox(addr("a@x.org")),
                    params: MailParams {
                        ret: Some(Ret::Headers),
                        envid: Some("QQ+2B1".into()),
                        ..MailParams::default()
                    },
                },
            ),
            (
                "BDAT 1000",
                Command::Bdat {
                    size: 1000,
                    last: false,
                },
            ),
            (
                "bdat 0 last",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            ("STARTTLS", Command::StartTls),
            (
                "AUTH plain AGpvAHNlY3JldA==",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AGpvAHNlY3JldA==".into()),
                },
            ),
            (
                "AUTH LOGIN",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial: None,
                },
            ),
            ("DATA", Command::Data),
            ("rset", Command::Rset),
            ("NOOP anything", Command::Noop),
            ("VRFY jo", Command::Vrfy("jo".into())),
            ("HELP", Command::Help(String::new())),
            ("quit", Command::Quit),
        ];
        for (line, want) in cases {
            assert_eq!(parse_command(line.as_bytes()), Ok(want), "{line}");
        }
    }

    #[test]
    fn postmaster_alone_is_a_recipient() {
        for line in [
            "RCPT TO:<Postmaster>",
            "RCPT TO:<postmaster>",
            "rcpt to:<POSTMASTER>",
        ] {
            match parse_command(line.as_bytes()) {
                Ok(Command::Rcpt { to, .. }) => assert!(to.is_bare_postmaster(), "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_command(b"RCPT TO:<hostmaster>"),
            Err(CommandError::Recipient(AddressError::NoDomain))
        ));
    }

    #[test]
    fn refuses_bad_commands_table() {
        use CommandError::*;
        let cases: Vec<(&[u8], CommandError)> = vec![
            (b"", Unrecognized),
            (b"HELLO there", Unrecognized),
            (b"XYZZY", Unrecognized),
            (b"EHLO", Syntax("EHLO hostname")),
            // A bare CR, a NUL or a space in the name would be written into
            // Received: as it came.
            (
                b"EHLO evil\rX-Injected: cr",
                Syntax("HELO/EHLO hostname, without spaces or control characters"),
            ),
            (
                b"HELO evil\0nul",
                Syntax("HELO/EHLO hostname, without spaces or control characters"),
            ),
            (
                b"EHLO two words",
                Syntax("HELO/EHLO hostname, without spaces or control characters"),
            ),
            // xtext that decodes to CR LF would write lines into a DSN.
            (
                b"MAIL FROM:<a@x.org> ENVID=x+0D+0ABcc:+20evil@example",
                ParameterValue("ENVID=x+0D+0ABcc:+20evil@example".into()),
            ),
            (
                b"RCPT TO:<a@x.org> ORCPT=rfc822;a@x.org+0D+0AX:+20y",
                ParameterValue("ORCPT=rfc822;a@x.org+0D+0AX:+20y".into()),
            ),
            (b"MAIL jo@x.org", Syntax("MAIL FROM:<address>")),
            (
                b"MAIL FROM:<jo@x.org",
                Syntax("path is missing its closing '>'"),
            ),
            (b"MAIL FROM:<jo>", Sender(AddressError::NoDomain)),
            (b"RCPT TO:<jo@>", Recipient(AddressError::BadDomain)),
            (b"MAIL FROM:<jo@x.org> FOO=1", Parameter("FOO".into())),
            (
                b"MAIL FROM:<jo@x.org> SIZE=big",
                ParameterValue("SIZE=big".into()),
            ),
            (
                b"MAIL FROM:<jo@x.org> BODY=BINARYMIME",
                ParameterValue("BODY=BINARYMIME".into()),
            ),
            (b"RCPT TO:<>", Syntax("RCPT TO:<address>")),
            (b"RCPT TO:<a@x.org> FOO=1", Parameter("FOO".into())),
            (
                b"RCPT TO:<a@x.org> NOTIFY=NEVER,DELAY",
                ParameterValue("NOTIFY=NEVER,DELAY".into()),
            ),
            (
                b"RCPT TO:<a@x.org> NOTIFY=SOMETIMES",
                ParameterValue("NOTIFY=SOMETIMES".into()),
            ),
            (
                b"RCPT TO:<a@x.org> ORCPT=nosemicolon",
                ParameterValue("ORCPT=nosemicolon".into()),
            ),
            (
                b"MAIL FROM:<a@x.org> RET=ALL",
                ParameterValue("RET=ALL".into()),
            ),
            (
                b"MAIL FROM:<a@x.org> ENVID=a=b",
                ParameterValue("ENVID=a=b".into()),
            ),
            (
                b"MAIL FROM:<a@x.org> ENVID=a+4",
                ParameterValue("ENVID=a+4".into()),
            ),
            (b"BDAT", Syntax("BDAT size [LAST]")),
            (b"BDAT ten", Syntax("BDAT size [LAST]")),
            (b"BDAT 10 FIRST", Syntax("BDAT size [LAST]")),
            (b"STARTTLS now", Syntax("STARTTLS")),
            (b"AUTH", Syntax("AUTH mechanism [initial-response]")),
            (b"RCPT <a@x.org>", Syntax("RCPT TO:<address>")),
            (b"DATA now", Syntax("DATA")),
            (b"QUIT please", Syntax("QUIT")),
            (b"VRFY", Syntax("VRFY address")),
            (b"MAIL FROM:\xff@x.org", NotUtf8),
            (b"\0\0\0\0", Unrecognized),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_command(line),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
