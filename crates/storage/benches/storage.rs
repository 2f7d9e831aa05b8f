//! Storage's two figures, against a real server on loopback and a real
//! disk (each Deliver fsyncs the message and its directory):
//!
//! 1. `Deliver` calls per second for 4 KiB messages, 16 in flight;
//! 2. `ListMessages` (first page of 50) latency for a mailbox of 100,000
//!    messages.
//!
//! ```text
//! cargo bench -p correu-storage --bench storage
//! cargo bench -p correu-storage --bench storage -- 5000 100000
//! ```
//!
//! The arguments: how many Deliver calls, how many messages in the big
//! mailbox. The working directory is under `target/`, on the same disk as
//! the build; it is removed at the end.

// A benchmark: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use correu_proto::v1::storage_client::StorageClient;
use correu_proto::v1::{DeliverRequest, ListMessagesRequest};
use correu_runtime::Config;
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let calls = args.first().copied().unwrap_or(3000);
    let big = args.get(1).copied().unwrap_or(100_000);
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-storage");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();

    let mut cfg = Config {
        domains: vec!["example.org".into()],
        ..Config::default()
    };
    cfg.storage.root = base.join("mail");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move { correu_storage::run(&cfg, listener, stop).await }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = StorageClient::new(channel);

    // 1. Deliver, 4 KiB, 16 in flight, to 100 mailboxes.
    let body = "x".repeat(4096 - 100);
    let in_flight = 16;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..in_flight {
        let mut c = client.clone();
        let body = body.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            for i in (w..calls).step_by(in_flight) {
                let req = DeliverRequest {
                    queue_id: format!("B{i:08}"),
                    sender: "jo@domini.com".into(),
                    recipient: format!("user{}@example.org", i % 100),
                    content: format!("Subject: {i}\r\n\r\n{body}\r\n").into_bytes(),
                    received_at_unix_micros: 1_790_000_000_000_000,
                    folder: String::new(),
                };
                let t = Instant::now();
                c.deliver(req).await.expect("deliver");
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(l) = tasks.join_next().await {
        lat.extend(l.unwrap());
    }
    let took = started.elapsed();
    lat.sort();
    println!(
        "Deliver 4 KiB, {in_flight} in flight: {calls} calls in {:.2} s = {:.0} calls/s; latency p50 {:.2} ms, p99 {:.2} ms",
        took.as_secs_f64(),
        calls as f64 / took.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );

    // 2. A mailbox of `big` messages (written directly in Maildir form:
    // how they got there does not matter to the listing), then the first
    // page of ListMessages.
    let new = base.join("mail/example.org/big/new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::create_dir_all(base.join("mail/example.org/big/cur")).unwrap();
    std::fs::create_dir_all(base.join("mail/example.org/big/tmp")).unwrap();
    for i in 0..big {
        std::fs::write(
            new.join(format!("{}.F{i:08}_0.bench,S=64", 1_790_000_000 + i)),
            b"Subject: x\r\n\r\nx\r\n",
        )
        .unwrap();
    }
    let mut c = client.clone();
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let page = c
            .list_messages(ListMessagesRequest {
                address: "big@example.org".into(),
                page_size: 50,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        times.push(t.elapsed());
        assert_eq!(page.messages.len(), 50);
    }
    times.sort();
    println!(
        "ListMessages, first page of 50, mailbox of {big}: median {:.1} ms, max {:.1} ms (10 runs)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );

    stop.cancel();
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&base);
}
