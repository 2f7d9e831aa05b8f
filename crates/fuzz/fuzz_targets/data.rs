//! Any bytes after DATA, in any chunking: the end is the first CRLF.CRLF,
//! and a dot-stuffed body comes back byte for byte.
#![no_main]
use correu_smtp::data::{DataReceiver, Progress, dot_stuff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, Vec<u8>, u8)| {
    let (raw, body, step) = input;
    let step = usize::from(step.max(1));
    // 1. Raw bytes: the receiver stops exactly at the first CRLF.CRLF.
    let mut wire = b"\r\n".to_vec();
    wire.extend_from_slice(&raw);
    let first = wire.windows(5).position(|w| w == b"\r\n.\r\n").map(|p| p + 3);
    let mut rx = DataReceiver::new(1 << 16);
    let mut out = Vec::new();
    let mut end = None;
    for (i, chunk) in raw.chunks(step).enumerate() {
        if let Progress::Done(n) = rx.feed(chunk, &mut out) {
            end = Some(i * step + n);
            break;
        }
    }
    assert_eq!(end, first);
    // 2. A mailbox-shaped body (CRLF lines) survives stuffing and receiving.
    let mut clean: Vec<u8> = body.iter().copied().filter(|b| *b != b'\r' && *b != b'\n').collect();
    clean = clean.split(|b| *b == b'|').flat_map(|l| [l, b"\r\n"].concat()).collect();
    let mut stuffed = Vec::new();
    dot_stuff(&clean, &mut stuffed);
    let mut rx = DataReceiver::new(1 << 20);
    let mut back = Vec::new();
    let mut done = false;
    for chunk in stuffed.chunks(step) {
        if let Progress::Done(_) = rx.feed(chunk, &mut back) {
            done = true;
        }
    }
    assert!(done);
    assert_eq!(back, clean);
});
