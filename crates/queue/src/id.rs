//! Queue ids: short, unique across replicas, sortable by time, and safe in
//! file names and headers.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// Crockford's base32 alphabet: no I, L, O or U to misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new queue id: 11 characters of microseconds since the epoch, then 6 of
/// randomness (30 bits), so two replicas accepting in the same microsecond
/// still differ with near certainty.
pub fn new_queue_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let random: u32 = rand::rng().random();
    let mut out = String::with_capacity(17);
    for i in (0..11).rev() {
        out.push(ALPHABET[((micros >> (i * 5)) & 31) as usize] as char);
    }
    for i in (0..6).rev() {
        out.push(ALPHABET[((random >> (i * 5)) & 31) as usize] as char);
    }
    out
}

/// Whether `s` looks like a queue id (and so is safe as a file name).
pub fn is_queue_id(s: &str) -> bool {
    s.len() == 17 && s.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_well_formed() {
        let a = new_queue_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_queue_id();
        assert!(is_queue_id(&a) && is_queue_id(&b), "{a} {b}");
        assert!(a[..11] < b[..11], "{a} then {b}");
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| new_queue_id()).collect();
        assert_eq!(many.len(), 10_000);
        assert!(!is_queue_id("../../etc/passwd"));
    }
}
