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
    },
    Data,
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
    if verb.len() > 4 {
        return Err(CommandError::Unrecognized);
    }
    let verb = verb.to_ascii_uppercase();
    let arg = rest.trim_matches(' ');
    match verb.as_str() {
        "HELO" => Ok(Command::Helo(arg.to_string())),
        "EHLO" => {
            if arg.is_empty() {
                return Err(CommandError::Syntax("EHLO hostname"));
            }
            Ok(Command::Ehlo(arg.to_string()))
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_arg(arg, Command::Data, "DATA"),
        "RSET" => no_arg(arg, Command::Rset, "RSET"),
        // NOOP may carry a string, which is ignored (RFC 5321 §4.1.1.9).
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_arg(arg, Command::Quit, "QUIT"),
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
            (k, _) => return Err(CommandError::Parameter(k.to_string())),
        }
    }
    Ok(Command::Mail { from, params: p })
}

fn parse_rcpt(rest: &str) -> Result<Command, CommandError> {
    let rest = strip_prefix_ci(rest, "TO:").ok_or(CommandError::Syntax("RCPT TO:<address>"))?;
    let (path, rest) = split_path(rest)?;
    if path.is_empty() {
        return Err(CommandError::Syntax("RCPT TO:<address>"));
    }
    let path = strip_source_route(path);
    // "Postmaster" alone names the postmaster of this server (RFC 5321 §4.1.1.3);
    // it is accepted by the session, which knows the domain.
    let to = Address::parse(path).map_err(CommandError::Recipient)?;
    if let Some((k, _)) = params(rest)?.into_iter().next() {
        return Err(CommandError::Parameter(k));
    }
    Ok(Command::Rcpt { to })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
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
                        smtputf8: false,
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
                },
            ),
            (
                "RCPT TO:<@relay.example:pere@localhost>",
                Command::Rcpt {
                    to: addr("pere@localhost"),
                },
            ),
            (
                "RCPT TO:<\"a>b\"@localhost>",
                Command::Rcpt {
                    to: addr("\"a>b\"@localhost"),
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
    fn refuses_bad_commands_table() {
        use CommandError::*;
        let cases: Vec<(&[u8], CommandError)> = vec![
            (b"", Unrecognized),
            (b"HELLO there", Unrecognized),
            (b"XYZZY", Unrecognized),
            (b"EHLO", Syntax("EHLO hostname")),
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
            (
                b"RCPT TO:<a@x.org> NOTIFY=NEVER",
                Parameter("NOTIFY".into()),
            ),
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
