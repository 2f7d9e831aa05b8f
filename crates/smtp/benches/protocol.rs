//! Criterion benchmarks of the protocol code (no IO):
//! - the DATA receiver, in bytes per second, for a 4 KiB and a 1 MiB message;
//! - a whole SMTP transaction through the session machine, in sessions per
//!   second (EHLO, MAIL, RCPT, DATA with a 4 KiB body, QUIT).
//!
//! Run: `cargo bench -p correu-smtp --bench protocol`.

use std::hint::black_box;
use std::sync::Arc;

use correu_smtp::data::{DataReceiver, Progress, dot_stuff};
use correu_smtp::session::{Policy, RecipientVerdict, Session, SessionConfig, Step};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn message(size: usize) -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    let mut body = b"Subject: bench\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(line);
        body.extend_from_slice(b".a dot-stuffed line\r\n");
    }
    let mut wire = Vec::new();
    dot_stuff(&body, &mut wire);
    wire
}

fn data_receiver(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_receiver");
    for (name, size) in [("4KiB", 4 << 10), ("1MiB", 1 << 20)] {
        let wire = message(size);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(name, |b| {
            let mut out = Vec::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                let mut rx = DataReceiver::new(64 << 20);
                // 16 KiB reads, as the driver does.
                for chunk in wire.chunks(16 << 10) {
                    if let Progress::Done(n) = rx.feed(black_box(chunk), &mut out) {
                        black_box(n);
                    }
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn whole_session(c: &mut Criterion) {
    let cfg = Arc::new(SessionConfig {
        hostname: "mx.example.org".into(),
        local_domains: vec!["example.org".into()],
        max_message_size: 25 << 20,
        max_recipients: 100,
        max_errors: 20,
        max_transactions: 100,
        max_text_line: 1000,
        reject_bare_line_ends: false,
        max_hops: 100,
    });
    let wire = message(4 << 10);
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    g.bench_function("transaction_4KiB", |b| {
        let mut replies = Vec::with_capacity(1024);
        let mut body = Vec::with_capacity(8 << 10);
        b.iter(|| {
            replies.clear();
            body.clear();
            let mut s = Session::new(cfg.clone(), Policy::mx(false));
            s.greeting().write_to(&mut replies);
            for line in [
                &b"EHLO client.example.net"[..],
                b"MAIL FROM:<jo@example.net> SIZE=4200",
                b"RCPT TO:<pere@example.org>",
                b"DATA",
            ] {
                let step = match s.command(line) {
                    Step::CheckRecipient(to) => s.recipient_checked(to, RecipientVerdict::Exists),
                    other => other,
                };
                if let Step::Reply(r) | Step::Data(r) = step {
                    r.write_to(&mut replies);
                }
            }
            let mut rx = DataReceiver::new(25 << 20);
            for chunk in wire.chunks(16 << 10) {
                rx.feed(chunk, &mut body);
            }
            let env = s.data_received(rx.report());
            s.queued(
                env.as_ref()
                    .map(|_| "1K1AH7X1HXN6Q0Y23")
                    .map_err(|_| correu_smtp::session::QueueFailure::Unavailable),
            )
            .write_to(&mut replies);
            if let Step::Close(r) = s.command(b"QUIT") {
                r.write_to(&mut replies);
            }
            black_box(replies.len())
        })
    });
    g.finish();
}

criterion_group!(benches, data_receiver, whole_session);
criterion_main!(benches);
