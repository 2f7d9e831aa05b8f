//! The Sender Rewriting Scheme, as libsrs2 and postsrsd write it, so that
//! mail an alias forwards to another domain still passes SPF at the next
//! hop (the envelope sender becomes an address of ours) and its bounces
//! come back here, to be sent on to the original sender.
//!
//! - `SRS0=HHHH=TT=domain=local@ours`: `local@domain` forwarded by us.
//! - `SRS1=HHHH=first==HHHH=TT=domain=local@ours`: an SRS0 address of
//!   `first` forwarded again; a bounce goes back to `first`, which
//!   reverses its own part.
//!
//! `TT` is the day (mod 1024) in base32; `HHHH` the first four base64
//! characters of HMAC-SHA256 over the lower-cased fields with the secret.
//! Addresses older than [`MAX_AGE_DAYS`] or with a wrong hash are refused,
//! so nobody can use the scheme to relay through us.

use base64::Engine;
use sha2::{Digest, Sha256};

/// How long a rewritten sender stays valid for bounces (postsrsd's 21 days).
pub const MAX_AGE_DAYS: u64 = 21;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const HASH_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SrsError {
    #[error("not an SRS address")]
    NotSrs,
    #[error("malformed SRS address")]
    Malformed,
    #[error("SRS address with a wrong hash")]
    BadHash,
    #[error("SRS address has expired")]
    Expired,
}

/// HMAC-SHA256 (RFC 2104) of the lower-cased parts, base64, its first
/// four characters.
fn hash(secret: &[u8], parts: &[&str]) -> String {
    let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
    let parts: Vec<&[u8]> = lower.iter().map(|p| p.as_bytes()).collect();
    let full = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(secret, &parts));
    full[..HASH_LEN].to_string()
}

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts` under `secret` (for
/// SRS here, and for webhook signatures).
pub fn hmac_sha256(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let mut inner = Sha256::new();
    inner.update(key.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(key.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn timestamp(day: u64) -> String {
    let t = day % 1024;
    [
        BASE32[(t >> 5) as usize] as char,
        BASE32[(t & 31) as usize] as char,
    ]
    .iter()
    .collect()
}

fn day_of(tt: &str) -> Option<u64> {
    let mut v = 0u64;
    if tt.len() != 2 {
        return None;
    }
    for c in tt.bytes() {
        let i = BASE32.iter().position(|b| *b == c.to_ascii_uppercase())?;
        v = (v << 5) | i as u64;
    }
    Some(v)
}

/// The envelope sender for mail from `sender` (`local@domain`) that we
/// forward, as an address at `ours`. `day` is days since the Unix epoch.
pub fn forward(secret: &[u8], sender: &str, ours: &str, day: u64) -> String {
    let Some((local, domain)) = sender.rsplit_once('@') else {
        return sender.to_string();
    };
    if domain.eq_ignore_ascii_case(ours) {
        // Our own sender passes SPF as it is.
        return sender.to_string();
    }
    let prefix = local.get(..5).map(str::to_ascii_uppercase);
    match prefix.as_deref() {
        Some("SRS0=") | Some("SRS0-") | Some("SRS0+") => {
            // Forwarded again: keep the first forwarder's part whole.
            let rest = &local[5..];
            let h = hash(secret, &[domain, rest]);
            format!("SRS1={h}={domain}=={rest}@{ours}")
        }
        Some("SRS1=") | Some("SRS1-") | Some("SRS1+") => {
            // Already SRS1: only the first forwarder's name matters.
            let rest = &local[5..];
            match rest.split_once("==") {
                Some((hh_first, inner)) => {
                    let first = hh_first.split_once('=').map_or(hh_first, |(_, f)| f);
                    let h = hash(secret, &[first, inner]);
                    format!("SRS1={h}={first}=={inner}@{ours}")
                }
                None => srs0(secret, local, domain, ours, day),
            }
        }
        _ => srs0(secret, local, domain, ours, day),
    }
}

fn srs0(secret: &[u8], local: &str, domain: &str, ours: &str, day: u64) -> String {
    let tt = timestamp(day);
    let h = hash(secret, &[&tt, domain, local]);
    format!("SRS0={h}={tt}={domain}={local}@{ours}")
}

/// Whether `local` (a local part) looks like SRS, so a recipient check
/// asks [`reverse`] before the mailboxes.
pub fn is_srs(local: &str) -> bool {
    let p = local.get(..5).map(str::to_ascii_uppercase);
    matches!(p.as_deref(), Some("SRS0=") | Some("SRS1="))
}

/// Where a bounce to the SRS address `local@…` goes: the original sender
/// (SRS0), or the first forwarder's SRS0 address (SRS1). Checked against
/// the hash and, for SRS0, [`MAX_AGE_DAYS`].
pub fn reverse(secret: &[u8], local: &str, day: u64) -> Result<String, SrsError> {
    if !is_srs(local) {
        return Err(SrsError::NotSrs);
    }
    let kind = local.as_bytes()[3];
    let rest = &local[5..];
    if kind == b'1' {
        let (hh_first, inner) = rest.split_once("==").ok_or(SrsError::Malformed)?;
        let (h, first) = hh_first.split_once('=').ok_or(SrsError::Malformed)?;
        if first.is_empty() || inner.is_empty() {
            return Err(SrsError::Malformed);
        }
        if !h.eq_ignore_ascii_case(&hash(secret, &[first, inner])) {
            return Err(SrsError::BadHash);
        }
        return Ok(format!("SRS0={inner}@{first}"));
    }
    let mut it = rest.splitn(4, '=');
    let (Some(h), Some(tt), Some(domain), Some(orig)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(SrsError::Malformed);
    };
    if domain.is_empty() || orig.is_empty() {
        return Err(SrsError::Malformed);
    }
    if !h.eq_ignore_ascii_case(&hash(secret, &[tt, domain, orig])) {
        return Err(SrsError::BadHash);
    }
    let then = day_of(tt).ok_or(SrsError::Malformed)?;
    let age = (day % 1024 + 1024 - then) % 1024;
    if age > MAX_AGE_DAYS {
        return Err(SrsError::Expired);
    }
    Ok(format!("{orig}@{domain}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &[u8] = b"a secret";
    const DAY: u64 = 20_790;

    fn local(a: &str) -> &str {
        a.rsplit_once('@').map(|(l, _)| l).unwrap()
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn srs0_round_trips_and_is_case_blind() {
        let a = forward(S, "Jo.Smith@signed.test", "fwd.test", DAY);
        assert!(
            a.starts_with("SRS0=") && a.ends_with("=signed.test=Jo.Smith@fwd.test"),
            "{a}"
        );
        assert_eq!(reverse(S, local(&a), DAY).unwrap(), "Jo.Smith@signed.test");
        // Some hops lower-case the local part.
        assert_eq!(
            reverse(S, &local(&a).to_lowercase(), DAY + 3).unwrap(),
            "jo.smith@signed.test"
        );
    }

    #[test]
    fn forged_expired_and_malformed_addresses_are_refused() {
        let a = forward(S, "jo@signed.test", "fwd.test", DAY);
        assert_eq!(reverse(b"other", local(&a), DAY), Err(SrsError::BadHash));
        assert_eq!(
            reverse(S, local(&a), DAY + MAX_AGE_DAYS + 1),
            Err(SrsError::Expired)
        );
        assert!(reverse(S, local(&a), DAY + MAX_AGE_DAYS).is_ok());
        // The day counter wraps at 1024.
        let wrap = forward(S, "jo@signed.test", "fwd.test", 1023);
        assert!(reverse(S, local(&wrap), 1024 + 2).is_ok());
        let tampered = local(&a).replace("signed.test", "victim.test");
        assert_eq!(reverse(S, &tampered, DAY), Err(SrsError::BadHash));
        assert_eq!(reverse(S, "SRS0=abcd", DAY), Err(SrsError::Malformed));
        assert_eq!(reverse(S, "jo", DAY), Err(SrsError::NotSrs));
    }

    #[test]
    fn srs_of_srs_is_srs1_and_goes_back_to_the_first_forwarder() {
        let first = forward(b"theirs", "jo@signed.test", "first.test", DAY);
        let second = forward(S, &first, "fwd.test", DAY);
        assert!(second.starts_with("SRS1="), "{second}");
        assert_eq!(reverse(S, local(&second), DAY).unwrap(), first);
        let third = forward(b"third", &second, "third.test", DAY);
        assert!(
            third.starts_with("SRS1=") && third.contains("=first.test=="),
            "{third}"
        );
        assert_eq!(reverse(b"third", local(&third), DAY).unwrap(), first);
    }

    #[test]
    fn our_own_senders_stay() {
        assert_eq!(
            forward(S, "pere@fwd.test", "fwd.test", DAY),
            "pere@fwd.test"
        );
    }
}
