//! An OTLP/gRPC trace receiver that prints its endpoint and keeps what it
//! is sent until killed: the far end for benchmarks with tracing on
//! (`scripts/bench-telemetry`).

fn main() {
    let r = correu_testkit::OtlpReceiver::start();
    println!("{}", r.endpoint());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(10));
        eprintln!("{} spans received", r.spans().len());
    }
}
