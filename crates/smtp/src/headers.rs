//! Header fields added on the way: dates (RFC 5322 §3.3) and trace fields,
//! and the count of trace fields that stops mail loops (RFC 5321 §6.3).

/// A value as it may stand in a header field Correu writes (`Received:`,
/// `Return-Path:`, a DSN's fields): every control character (CR, LF, NUL,
/// TAB …) becomes `?`, so no value from the envelope, the client or a
/// remote server can end the field or start another.
pub fn field_value(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Formats seconds since the Unix epoch as an RFC 5322 date in UTC, for
/// example `Sat, 28 Nov 2026 10:56:21 +0000`.
pub fn rfc5322_date(unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Formats seconds since the Unix epoch as RFC 3339 in UTC, for example
/// `2026-11-28T10:56:21Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(unix_secs.div_euclid(86_400));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// How many `Received:` fields the header section of `message` holds: the
/// hops it has made (RFC 5321 §6.3 detects loops by counting them). The
/// header section ends at the first empty line; a continuation line (one
/// starting with white space) is part of the field before it; a field name
/// may be followed by white space before its colon (RFC 5322 §4.5.3).
pub fn received_count(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"received") {
            let rest = &line[8..];
            let colon = rest.iter().position(|&b| b != b' ' && b != b'\t');
            if colon.is_some_and(|i| rest[i] == b':') {
                count += 1;
            }
        }
    }
    count
}

/// The fields of a message's header section, each as the range of its
/// lines (continuation lines and line ends included), and where the body
/// starts: after the empty line, or at the end when there is none. A line
/// starting with white space continues the field before it.
pub fn fields(message: &[u8]) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut fields: Vec<std::ops::Range<usize>> = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let end = message[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| at + i + 1);
        let line = &message[at..end];
        let bare = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if bare.is_empty() {
            return (fields, end);
        }
        match (bare[0], fields.last_mut()) {
            (b' ' | b'\t', Some(f)) => f.end = end,
            _ => fields.push(at..end),
        }
        at = end;
    }
    (fields, message.len())
}

/// `message` without the `Authentication-Results:` fields of its header
/// section that name `authserv_id` (RFC 8601 §5: a receiver removes such
/// fields arriving from outside, since only it may write them; others'
/// fields stay). Comments and white space before the id are skipped; ids
/// compare without case. Borrowed when nothing is removed.
pub fn without_auth_results<'m>(
    message: &'m [u8],
    authserv_id: &str,
) -> std::borrow::Cow<'m, [u8]> {
    const NAME: &[u8] = b"authentication-results";
    let ours: Vec<std::ops::Range<usize>> = fields(message)
        .0
        .into_iter()
        .filter(|f| {
            let field = &message[f.clone()];
            let Some(colon) = field.iter().position(|&b| b == b':') else {
                return false;
            };
            field[..colon].trim_ascii_end().eq_ignore_ascii_case(NAME)
                && first_token(&field[colon + 1..]).eq_ignore_ascii_case(authserv_id.as_bytes())
        })
        .collect();
    if ours.is_empty() {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len());
    let mut copied = 0;
    for f in ours {
        out.extend_from_slice(&message[copied..f.start]);
        copied = f.end;
    }
    out.extend_from_slice(&message[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The first token of a structured field value: white space (folding
/// included) and `(comments)` skipped, up to `;`, white space or `(`.
fn first_token(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let rest = &value[i.min(value.len())..];
    let end = rest
        .iter()
        .position(|&b| matches!(b, b';' | b' ' | b'\t' | b'\r' | b'\n' | b'('))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The `Received:` field a server adds for a message it takes (RFC 5321
/// §4.4), with the TLS in use, the authenticated user and the protocol
/// name of RFC 3848. Every value that came from the client is made safe
/// for a header field (the parser already refuses controls in HELO; this
/// holds for whatever else reaches here), so the field is always exactly
/// its own lines.
pub fn received(
    env: &crate::session::Envelope,
    client: std::net::IpAddr,
    host: &str,
    id: &str,
    now_secs: i64,
) -> String {
    let helo = if env.helo.is_empty() {
        "unknown".into()
    } else {
        field_value(&env.helo)
    };
    let tls = match &env.tls {
        Some(t) => format!("\r\n\t(using {})", field_value(t)),
        None => String::new(),
    };
    let user = match &env.user {
        Some(u) => format!("\r\n\t(Authenticated sender: {})", field_value(u)),
        None => String::new(),
    };
    let rcpt = match env.recipients.as_slice() {
        [one] => format!("\r\n\tfor <{}>", field_value(&one.address.to_string())),
        _ => String::new(),
    };
    format!(
        "Received: from {helo} ([{client}]){tls}{user}\r\n\tby {host} (Correu) with {proto} id {id}{rcpt};\r\n\t{date}\r\n",
        host = field_value(host),
        proto = env.protocol,
        id = field_value(id),
        date = rfc5322_date(now_secs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_863_381),
            "Sat, 28 Nov 2026 10:56:21 +0000"
        );
    }

    #[test]
    fn counts_received_fields_in_the_header_section_only() {
        let m = concat!(
            "Received: from a by b;\r\n\tSat, 28 Nov 2026 10:56:21 +0000\r\n",
            "RECEIVED : from c\r\n",
            "received:x\r\n",
            "Received-SPF: pass\r\n",
            "X-Received: no\r\n",
            "Subject: Received: not a field name\r\n",
            " Received: a continuation\r\n",
            "\r\n",
            "Received: in the body\r\n",
        )
        .as_bytes();
        assert_eq!(received_count(m), 3);
        // Bare LF line ends, and a message with no body.
        assert_eq!(received_count(b"Received: a\nReceived: b\n"), 2);
        assert_eq!(received_count(b""), 0);
        assert_eq!(received_count(b"\r\nReceived: body\r\n"), 0);
        assert_eq!(received_count(b"Received"), 0);
    }

    #[test]
    fn forged_authentication_results_for_this_server_are_removed() {
        let m = concat!(
            "Authentication-Results: mx.correu.test; spf=pass\r\n",
            "Received: from a\r\n",
            "authentication-results : (forged) MX.Correu.Test;\r\n",
            "\tdkim=pass header.d=bank.test\r\n",
            "Authentication-Results: other.test; dmarc=pass\r\n",
            "Authentication-Results: mx.correu.test.evil; spf=pass\r\n",
            "Subject: hi\r\n",
            "\r\n",
            "Authentication-Results: mx.correu.test; in the body\r\n",
        );
        let out = without_auth_results(m.as_bytes(), "mx.correu.test");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            concat!(
                "Received: from a\r\n",
                "Authentication-Results: other.test; dmarc=pass\r\n",
                "Authentication-Results: mx.correu.test.evil; spf=pass\r\n",
                "Subject: hi\r\n",
                "\r\n",
                "Authentication-Results: mx.correu.test; in the body\r\n",
            )
        );
        // Nothing to remove: the same bytes, not a copy.
        let clean = b"Subject: x\r\n\r\nbody\r\n";
        assert!(matches!(
            without_auth_results(clean, "mx.correu.test"),
            std::borrow::Cow::Borrowed(_)
        ));
        // A message that is all header, ending without a line end.
        assert_eq!(
            &*without_auth_results(b"Authentication-Results: mx.correu.test", "mx.correu.test"),
            b""
        );
    }

    #[test]
    fn field_values_cannot_start_a_line() {
        assert_eq!(field_value("mx.example.org"), "mx.example.org");
        assert_eq!(
            field_value("evil\r\nX-Injected: yes"),
            "evil??X-Injected: yes"
        );
        assert_eq!(field_value("a\0b\tc\x7fd"), "a?b?c?d");
        assert_eq!(field_value("josé"), "josé");
    }
}
