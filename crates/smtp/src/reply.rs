//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 3463), and
//! a parser for replies read by an SMTP client.

use std::fmt;

/// An enhanced status code `class.subject.detail` (RFC 3463 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One reply, possibly of several lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A one-line reply without an enhanced status code (greeting, HELO, 354).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply, each line its own text (EHLO, HELP).
    pub fn multi(code: u16, enhanced: Option<Enhanced>, lines: Vec<String>) -> Self {
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The reply's text, its lines joined by a space (for logs and DSNs).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the reply in wire form to `out`: every line `CODE-` except the
    /// last `CODE `, each ending in CRLF (RFC 5321 §4.2.1). The whole reply is
    /// written at once by the caller, so a multi-line reply is one segment.
    ///
    /// Reply text is printable ASCII, whatever went into it (an address
    /// echoed back, an error from elsewhere): anything else goes out as `?`,
    /// so no reply carries a control character or a byte a client cannot
    /// read.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}", self.code, sep).as_bytes());
            if let Some(e) = self.enhanced {
                out.extend_from_slice(format!("{e} ").as_bytes());
            }
            out.extend(line.chars().map(|c| {
                if (' '..='~').contains(&c) {
                    c as u8
                } else {
                    b'?'
                }
            }));
            out.extend_from_slice(b"\r\n");
        }
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{} \r\n", self.code).as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        write!(f, " {}", self.text())
    }
}

/// Why a reply could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("reply line does not start with a three-digit code: {0:?}")]
    BadCode(String),
    #[error("reply lines disagree on the code ({0} then {1})")]
    MixedCodes(u16, u16),
    #[error("reply longer than {0} lines")]
    TooLong(usize),
}

/// Most lines a reply may have before the client gives up on the server.
pub const MAX_REPLY_LINES: usize = 256;

/// Parses one complete reply from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the reply and how many
/// bytes it took. Enhanced codes are split off when the text starts with one
/// whose class matches the reply code's (RFC 3463 §2).
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let raw = &buf[pos..pos + nl];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos += nl + 1;
        let text = String::from_utf8_lossy(raw);
        let (this, rest) =
            split_code(&text).ok_or_else(|| ReplyError::BadCode(text.to_string()))?;
        match code {
            None => code = Some(this),
            Some(c) if c != this => return Err(ReplyError::MixedCodes(c, this)),
            _ => {}
        }
        let last = !rest.starts_with('-');
        let line = rest.get(1..).unwrap_or("").to_string();
        lines.push(line);
        if lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooLong(MAX_REPLY_LINES));
        }
        if last {
            break;
        }
    }
    let code = code.unwrap_or(0);
    let mut enhanced = None;
    if let Some((e, rest)) = lines.first().and_then(|l| split_enhanced(l, code)) {
        enhanced = Some(e);
        let rest = rest.to_string();
        // Strip the same code from every line that repeats it.
        for l in lines.iter_mut().skip(1) {
            if let Some((e2, r)) = split_enhanced(l, code)
                && e2 == e
            {
                *l = r.to_string();
            }
        }
        lines[0] = rest;
    }
    Ok(Some((
        Reply {
            code,
            enhanced,
            lines,
        },
        pos,
    )))
}

fn split_code(line: &str) -> Option<(u16, &str)> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    if b.len() > 3 && b[3] != b' ' && b[3] != b'-' {
        return None;
    }
    let code = line[..3].parse().ok()?;
    if !(200..600).contains(&code) {
        return None;
    }
    Some((code, &line[3..]))
}

fn split_enhanced(text: &str, code: u16) -> Option<(Enhanced, &str)> {
    let (word, rest) = match text.split_once(' ') {
        Some((w, r)) => (w, r),
        None => (text, ""),
    };
    let mut parts = word.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || u16::from(class) != code / 100 {
        return None;
    }
    Some((Enhanced(class, subject, detail), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_single_and_multi_line_replies() {
        let r = Reply::new(250, Enhanced(2, 1, 0), "Ok");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Ok\r\n");
        let r = Reply::multi(250, None, vec!["mx greets you".into(), "PIPELINING".into()]);
        assert_eq!(r.to_bytes(), b"250-mx greets you\r\n250 PIPELINING\r\n");
        assert_eq!(Reply::plain(354, "go").to_bytes(), b"354 go\r\n");
    }

    #[test]
    fn parses_replies_table() {
        type Want = Option<(u16, Option<Enhanced>, &'static [&'static str], usize)>;
        let cases: &[(&[u8], Want)] = &[
            (b"220 mx ESMTP\r\n", Some((220, None, &["mx ESMTP"], 14))),
            (
                b"250-mx\r\n250-SIZE 10\r\n250 PIPELINING\r\nextra",
                Some((250, None, &["mx", "SIZE 10", "PIPELINING"], 37)),
            ),
            (
                b"550 5.1.1 No such user\r\n",
                Some((550, Some(Enhanced(5, 1, 1)), &["No such user"], 24)),
            ),
            // An enhanced code of another class is text, not a code.
            (b"250 5.1.1 odd\r\n", Some((250, None, &["5.1.1 odd"], 15))),
            (b"250 ok\n", Some((250, None, &["ok"], 7))),
            (b"250", None),
            (b"250-first\r\n", None),
            (b"354\r\n", Some((354, None, &[""], 5))),
        ];
        for (input, want) in cases {
            let got = parse_reply(input).expect("parses");
            match (got, want) {
                (None, None) => {}
                (Some((r, used)), Some((code, enh, lines, n))) => {
                    assert_eq!(r.code, *code, "{input:?}");
                    assert_eq!(r.enhanced, *enh, "{input:?}");
                    assert_eq!(r.lines, lines.to_vec(), "{input:?}");
                    assert_eq!(used, *n, "{input:?}");
                }
                (g, w) => panic!("{input:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn rejects_garbage_and_mixed_codes() {
        assert!(matches!(
            parse_reply(b"hello\r\n"),
            Err(ReplyError::BadCode(_))
        ));
        assert!(matches!(
            parse_reply(b"999 no\r\n"),
            Err(ReplyError::BadCode(_))
        ));
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::MixedCodes(250, 251))
        );
    }

    #[test]
    fn round_trips_what_it_writes() {
        let r = Reply::multi(
            250,
            Some(Enhanced(2, 0, 0)),
            vec!["one".into(), "two".into()],
        );
        let (back, used) = parse_reply(&r.to_bytes()).unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(used, r.to_bytes().len());
    }
}
