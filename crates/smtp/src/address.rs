//! Mailbox addresses as SMTP carries them (RFC 5321 §4.1.2, RFC 6531 §3.3).

use std::fmt;

/// A mailbox `local-part@domain`. The local part is kept as the client sent
/// it (quoted strings included); the domain is kept lower-cased, since domains
/// compare without case (RFC 5321 §2.4).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    local: String,
    domain: String,
}

/// Why an address was refused; the reply is `501 5.1.3` (RFC 3463 §3.2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address has no @domain")]
    NoDomain,
    #[error("local part is not valid")]
    BadLocalPart,
    #[error("domain is not valid")]
    BadDomain,
    #[error("address is longer than 254 octets")]
    TooLong,
}

/// RFC 5321 §4.5.3.1.1 and .2: local part 64 octets, domain 255; a path is
/// 256 octets with its brackets, so an address is at most 254. The local
/// part's limit is not enforced (§4.5.3.1 asks for no limits where
/// possible, Postfix has none, and SRS addresses of forwarded mail often
/// pass 64): only the address's.
const MAX_DOMAIN: usize = 255;
const MAX_ADDRESS: usize = 254;

impl Address {
    /// Parses `local@domain` (no angle brackets).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.len() > MAX_ADDRESS {
            return Err(AddressError::TooLong);
        }
        let at = s.rfind('@').ok_or(AddressError::NoDomain)?;
        let (local, domain) = (&s[..at], &s[at + 1..]);
        if !valid_local(local) {
            return Err(AddressError::BadLocalPart);
        }
        if !valid_domain(domain) {
            return Err(AddressError::BadDomain);
        }
        Ok(Address {
            local: canonical_local(local),
            domain: domain.to_ascii_lowercase(),
        })
    }

    /// `RCPT TO:<Postmaster>` with no domain (RFC 5321 §4.1.1.3): this
    /// server's postmaster, whose domain the session fills in.
    pub fn bare_postmaster() -> Address {
        Address {
            local: "postmaster".into(),
            domain: String::new(),
        }
    }

    /// Whether this is [`Address::bare_postmaster`].
    pub fn is_bare_postmaster(&self) -> bool {
        self.domain.is_empty()
    }

    /// `postmaster@domain`.
    pub fn postmaster_at(domain: &str) -> Address {
        Address {
            local: "postmaster".into(),
            domain: domain.to_ascii_lowercase(),
        }
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether the address needs SMTPUTF8 to travel (RFC 6531).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// RFC 5322 atext, extended with any non-ASCII character (RFC 6531 §3.3).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn valid_local(local: &str) -> bool {
    if local.is_empty() {
        return false;
    }
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        // Quoted-string: qtextSMTP or quoted-pairSMTP (RFC 5321 §4.1.2).
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) if (' '..='~').contains(&n) => {}
                    _ => return false,
                },
                '"' => return false,
                c if (' '..='~').contains(&c) || !c.is_ascii() => {}
                _ => return false,
            }
        }
        return true;
    }
    // Dot-string: atoms separated by single dots.
    local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// A quoted local part that needs no quotes is the same mailbox as its
/// unquoted form (RFC 5321 §4.1.2: `"destinatari"` is `destinatari`), so
/// it is written without them; one that needs them keeps them.
fn canonical_local(local: &str) -> String {
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"'))
        && !inner.contains('\\')
        && !inner.is_empty()
        && inner
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
    {
        return inner.to_string();
    }
    local.to_string()
}

fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return false;
    }
    if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        // Address literal (RFC 5321 §4.1.3).
        if let Some(v6) = lit.strip_prefix("IPv6:") {
            return v6.parse::<std::net::Ipv6Addr>().is_ok();
        }
        return lit.parse::<std::net::Ipv4Addr>().is_ok();
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses_table() {
        let good = [
            "jo@domini.com",
            "Jo.Smith+tag@Example.ORG",
            "\"jo smith\"@example.org",
            "\"a\\\"b\"@example.org",
            "user@[127.0.0.1]",
            "user@[IPv6:::1]",
            "josé@exemple.cat",
            "用户@例子.广告",
            "x@a-b.c",
        ];
        for a in good {
            assert!(Address::parse(a).is_ok(), "{a} should parse");
        }
        let bad: &[(&str, AddressError)] = &[
            ("", AddressError::Empty),
            ("jo", AddressError::NoDomain),
            ("@example.org", AddressError::BadLocalPart),
            ("jo..x@example.org", AddressError::BadLocalPart),
            (".jo@example.org", AddressError::BadLocalPart),
            ("jo smith@example.org", AddressError::BadLocalPart),
            ("jo@", AddressError::BadDomain),
            ("jo@-a.org", AddressError::BadDomain),
            ("jo@a..org", AddressError::BadDomain),
            ("jo@[300.1.1.1]", AddressError::BadDomain),
            ("jo@exa mple.org", AddressError::BadDomain),
        ];
        for (a, e) in bad {
            assert_eq!(Address::parse(a).as_ref().err(), Some(e), "{a}");
        }
        // A long local part is taken (SRS addresses), a long address not.
        let long = format!("{}@example.org", "a".repeat(65));
        assert!(Address::parse(&long).is_ok());
        let long = format!("{}@example.org", "a".repeat(250));
        assert_eq!(Address::parse(&long), Err(AddressError::TooLong));
        let long = format!("a@{}.org", "b".repeat(260));
        assert_eq!(Address::parse(&long), Err(AddressError::TooLong));
    }

    #[test]
    fn quoted_local_parts_that_need_no_quotes_lose_them() {
        for (sent, kept) in [
            ("\"destinatari\"@example.test", "destinatari@example.test"),
            ("\"jo.smith\"@example.test", "jo.smith@example.test"),
            ("\"jo smith\"@example.test", "\"jo smith\"@example.test"),
            ("\"jo..smith\"@example.test", "\"jo..smith\"@example.test"),
            ("\"a\\\"b\"@example.test", "\"a\\\"b\"@example.test"),
        ] {
            assert_eq!(Address::parse(sent).unwrap().to_string(), kept, "{sent}");
        }
    }

    #[test]
    fn domain_is_lower_cased_local_part_kept() {
        let a = Address::parse("Jo@Domini.COM").unwrap();
        assert_eq!(a.local(), "Jo");
        assert_eq!(a.domain(), "domini.com");
        assert_eq!(a.to_string(), "Jo@domini.com");
        assert!(!a.is_utf8());
        assert!(Address::parse("josé@x.cat").unwrap().is_utf8());
    }
}
