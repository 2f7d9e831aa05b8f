//! The DATA receiver (RFC 5321 §4.1.1.4, §4.5.2): removes dot-stuffing and
//! finds the end of the message.
//!
//! Only `CRLF . CRLF` ends the message. A bare LF or a bare CR is written to
//! the message as CRLF but never counts as a line end for finding the final
//! dot: `LF . LF`, `CR . CR` and the like are body text. Servers that treat
//! them as an end let one message hide another (SMTP smuggling, 2023).

/// Where the receiver is in the line structure of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Just after a CRLF (or at the start of DATA).
    LineStart,
    /// Inside a line.
    Middle,
    /// Saw a CR, not yet known whether an LF follows.
    Cr,
    /// Saw `.` at a line start.
    Dot,
    /// Saw `.` `CR` at a line start.
    DotCr,
}

/// Receives a message after `354`, in chunks as they arrive.
#[derive(Debug)]
pub struct DataReceiver {
    state: State,
    max_size: usize,
    size: usize,
    overflow: bool,
    bare_line_ends: usize,
    /// Octets in the current line so far, and the longest line with its CRLF.
    line: usize,
    longest: usize,
}

/// What one call to [`DataReceiver::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// All input consumed; the message goes on.
    More,
    /// The message ended after this many input bytes; the rest is the next
    /// command (pipelined after the final dot).
    Done(usize),
}

impl DataReceiver {
    /// A receiver that keeps at most `max_size` octets of message. Beyond that
    /// it keeps reading to the final dot and reports [`DataReceiver::overflowed`].
    pub fn new(max_size: usize) -> Self {
        DataReceiver {
            state: State::LineStart,
            max_size,
            size: 0,
            overflow: false,
            bare_line_ends: 0,
            line: 0,
            longest: 0,
        }
    }

    /// Whether the message was larger than the limit (reply `552 5.3.4`).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// How many bare LF or bare CR the message held (each written as CRLF).
    pub fn bare_line_ends(&self) -> usize {
        self.bare_line_ends
    }

    /// Octets of message received so far, after unstuffing.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What the session checks once the message is in.
    pub fn report(&self) -> crate::session::BodyReport {
        crate::session::BodyReport {
            overflowed: self.overflow,
            bare_line_ends: self.bare_line_ends,
            longest_line: self.longest.max(self.line),
            // Counted from the whole message by the caller, which holds it.
            hops: 0,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if bytes == b"\r\n" {
            self.longest = self.longest.max(self.line + 2);
            self.line = 0;
        } else {
            self.line += bytes.len();
        }
        self.size += bytes.len();
        if self.size > self.max_size {
            self.overflow = true;
        }
        if !self.overflow {
            out.extend_from_slice(bytes);
        }
    }

    /// Feeds `input`, appending message octets to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Middle => {
                    // Copy the run up to the next CR or LF at once.
                    let run = input[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(input.len() - i);
                    if run > 0 {
                        self.emit(out, &input[i..i + run]);
                        i += run;
                        continue;
                    }
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.bare_line_ends += 1;
                        self.emit(out, b"\r\n");
                    }
                    i += 1;
                }
                State::LineStart => {
                    match b {
                        b'.' => self.state = State::Dot,
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            self.bare_line_ends += 1;
                            self.emit(out, b"\r\n");
                            self.state = State::Middle;
                        }
                        _ => {
                            self.state = State::Middle;
                            continue;
                        }
                    }
                    i += 1;
                }
                State::Cr => {
                    if b == b'\n' {
                        self.emit(out, b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // A bare CR: written as a line end, but not one that
                        // can start the final dot.
                        self.bare_line_ends += 1;
                        self.emit(out, b"\r\n");
                        self.state = State::Middle;
                    }
                }
                State::Dot => {
                    match b {
                        b'\r' => {
                            self.state = State::DotCr;
                            i += 1;
                        }
                        // A leading dot with more on the line is removed
                        // (RFC 5321 §4.5.2); what follows is plain text.
                        b'\n' => {
                            self.emit(out, b".");
                            self.state = State::Middle;
                        }
                        _ => self.state = State::Middle,
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::LineStart;
                        return Progress::Done(i + 1);
                    }
                    // `.` then a bare CR: the dot is text, the CR a line end.
                    self.emit(out, b".");
                    self.bare_line_ends += 1;
                    self.emit(out, b"\r\n");
                    self.state = State::Middle;
                }
            }
        }
        Progress::More
    }
}

/// Applies dot-stuffing for sending `body` in DATA (RFC 5321 §4.5.2) and adds
/// the final `.`; a body not ending in CRLF gets one first.
pub fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + 8);
    let mut line_start = true;
    for (i, &b) in body.iter().enumerate() {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n' && i > 0 && body[i - 1] == b'\r';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the whole input at once and byte by byte; both must agree.
    fn receive(input: &[u8]) -> (Option<usize>, Vec<u8>, usize) {
        let mut r = DataReceiver::new(1 << 20);
        let mut out = Vec::new();
        let done = match r.feed(input, &mut out) {
            Progress::Done(n) => Some(n),
            Progress::More => None,
        };
        let mut r2 = DataReceiver::new(1 << 20);
        let mut out2 = Vec::new();
        let mut done2 = None;
        for (i, b) in input.iter().enumerate() {
            if let Progress::Done(n) = r2.feed(std::slice::from_ref(b), &mut out2) {
                assert_eq!(n, 1);
                done2 = Some(i + 1);
                break;
            }
        }
        assert_eq!(done, done2, "chunking changed the end for {input:?}");
        assert_eq!(out, out2, "chunking changed the body for {input:?}");
        (done, out, r.bare_line_ends())
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf_table() {
        let cases: &[(&[u8], Option<usize>, &[u8])] = &[
            (b".\r\n", Some(3), b""),
            (b"hi\r\n.\r\n", Some(7), b"hi\r\n"),
            (b"hi\r\n.\r\nQUIT\r\n", Some(7), b"hi\r\n"),
            (b"..dot\r\n.\r\n", Some(10), b".dot\r\n"),
            (b"a\r\n..\r\n.\r\n", Some(10), b"a\r\n.\r\n"),
            (b".x\r\n.\r\n", Some(7), b"x\r\n"),
            (
                b"Bon dia, m\xc3\xb3n\r\n.\r\n",
                Some(18),
                "Bon dia, món\r\n".as_bytes(),
            ),
            // Smuggling attempts: none of these ends the message.
            (
                b"a\n.\nMAIL FROM:<x@y.z>\r\n",
                None,
                b"a\r\n.\r\nMAIL FROM:<x@y.z>\r\n",
            ),
            (b"a\r\n.\nb\r\n", None, b"a\r\n.\r\nb\r\n"),
            (b"a\n.\r\nb\r\n", None, b"a\r\n.\r\nb\r\n"),
            (b"a\r.\r\nb", None, b"a\r\n.\r\nb"),
            (b"a\r\n.\rb", None, b"a\r\n.\r\nb"),
            (b"a\r\n.\r\r\n.\r\n", Some(10), b"a\r\n.\r\n\r\n"),
            (b"no end", None, b"no end"),
        ];
        for (input, end, body) in cases {
            let (got_end, got_body, _) = receive(input);
            assert_eq!(got_end, *end, "end of {:?}", String::from_utf8_lossy(input));
            assert_eq!(
                got_body,
                body.to_vec(),
                "body of {:?}: {:?}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(&got_body)
            );
        }
    }

    #[test]
    fn reports_the_longest_line() {
        let mut r = DataReceiver::new(1 << 20);
        let mut out = Vec::new();
        r.feed(b"ab\r\n..cdef\r\n", &mut out);
        r.feed(b"x\r\n.\r\n", &mut out);
        // ".cdef" unstuffed is 5 octets, 7 with its CRLF.
        assert_eq!(r.report().longest_line, 7);
        assert!(!r.report().overflowed);
    }

    #[test]
    fn counts_bare_line_ends() {
        assert_eq!(receive(b"a\nb\rc\r\n.\r\n").2, 2);
        assert_eq!(receive(b"a\r\nb\r\n.\r\n").2, 0);
    }

    #[test]
    fn overflow_keeps_reading_to_the_end() {
        let mut r = DataReceiver::new(4);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"0123456789\r\n", &mut out), Progress::More);
        assert!(r.overflowed());
        assert_eq!(r.feed(b".\r\nQUIT", &mut out), Progress::Done(3));
        assert!(out.len() <= 4);
    }

    #[test]
    fn dot_stuffing_round_trips() {
        let bodies: &[&[u8]] = &[
            b"",
            b"hi\r\n",
            b".\r\n",
            b"..\r\n.x\r\n",
            b"no final newline",
            b"a\r\n.\r\nb\r\n",
        ];
        for body in bodies {
            let mut wire = Vec::new();
            dot_stuff(body, &mut wire);
            let (end, back, _) = receive(&wire);
            assert_eq!(end, Some(wire.len()), "{body:?}");
            let mut want = body.to_vec();
            if !want.is_empty() && !want.ends_with(b"\r\n") {
                want.extend_from_slice(b"\r\n");
            }
            assert_eq!(back, want, "{body:?}");
        }
    }
}
