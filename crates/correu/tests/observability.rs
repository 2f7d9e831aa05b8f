//! What an operator watching Correu sees: one trace per message across
//! the three processes (received by a real OTLP receiver), and the
//! `/metrics`, `/livez` and `/readyz` endpoints moving as mail flows.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use correu_testkit::*;

const CORREU: &str = env!("CARGO_BIN_EXE_correu");

fn start(dir: &Path, role: &str, cfg: &Path, otlp: &str) -> Proc {
    Proc::spawn(
        role,
        dir,
        CORREU,
        &[role, "--config", cfg.to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("POD_NAME", &format!("{role}-0")),
        ],
    )
}

fn send(addr: SocketAddr, to: &[&str], subject: &str) -> String {
    let mut c = Smtp::connect(addr);
    c.read();
    c.cmd("EHLO client.example");
    let id = queue_id(&c.send_mail(
        "jo@domini.com",
        to,
        &format!("Subject: {subject}\r\n\r\nhello\r\n"),
    ));
    c.cmd("QUIT");
    id
}

/// Starts storage with the configuration `base`, then writes the one the
/// other services read (`base` with storage's endpoint): storage, and
/// that file.
fn storage_first(
    dir: &Path,
    base: &str,
    start: impl Fn(&str, &Path) -> Proc,
) -> (Proc, std::path::PathBuf) {
    let storage_cfg = dir.join("storage.toml");
    std::fs::write(&storage_cfg, base).unwrap();
    let mut storage = start("storage", &storage_cfg);
    let storage_addr = storage.listening("storage listening");
    let cfg = dir.join("correu.toml");
    std::fs::write(
        &cfg,
        base.replace(
            "[storage]\n",
            &format!("[storage]\nendpoint = \"http://{storage_addr}\"\n"),
        ),
    )
    .unwrap();
    (storage, cfg)
}

fn in_trace<'a>(spans: &'a [ReceivedSpan], trace: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect()
}

#[test]
fn one_trace_per_message_across_three_processes_and_its_retries() {
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("otel");
    let receiver = OtlpReceiver::start();
    let otlp = receiver.endpoint();
    let remote = dir.path().join("remote");
    // The remote MX says 451 once: the retried attempt must be in the trace.
    let (_mx, mx_port) = flaky_mx(dir.path(), &remote, 1);
    let base = format!(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\nretry_delays = [\"1s\"]\n[delivery.routes]\n\"remote.test\" = \"127.0.0.1:{mx_port}\"\n",
        dir.path().join("mail").display(),
        vhost.url(RABBITMQ.parse().unwrap()),
    );
    let (storage, cfg) = storage_first(dir.path(), &base, |role, cfg| {
        start(dir.path(), role, cfg, &otlp)
    });
    let mut delivery = start(dir.path(), "delivery", &cfg, &otlp);
    delivery.wait_for("delivery consuming", Duration::from_secs(20));
    let mut ingress = start(dir.path(), "ingress", &cfg, &otlp);
    let smtp = ingress.listening("SMTP listening");

    let local = send(smtp, &["pere@localhost"], "traced");
    let relayed = send(smtp, &["ana@remote.test"], "retried");
    // A message with too many Received fields is refused when its data
    // ends: a transaction span all the same, in error.
    let mut c = Smtp::connect(smtp);
    c.read();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<jo@domini.com>");
    c.cmd("RCPT TO:<pere@localhost>");
    c.cmd("DATA");
    let looped = "Received: from a by b; Tue, 1 Dec 2026 10:00:00 +0000\r\n".repeat(120);
    let refused = c.cmd(&format!("{looped}Subject: loop\r\n\r\nhello\r\n."));
    assert_eq!(refused.code, 554, "{refused:?}");
    c.cmd("QUIT");
    wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        1,
        Duration::from_secs(30),
    );
    wait_maildir(&remote, 1, Duration::from_secs(30));

    let has = |spans: &[ReceivedSpan], id: &str, name: &str, n: usize| {
        spans
            .iter()
            .filter(|s| {
                s.name == name && s.attributes.get("queue_id").map(String::as_str) == Some(id)
            })
            .count()
            >= n
    };
    let spans = receiver.wait(Duration::from_secs(30), |s| {
        has(s, &local, "storage.deliver", 2)
            && has(s, &relayed, "delivery.message", 2)
            && s.iter().any(|s| {
                s.name == "smtp.transaction"
                    && s.attributes.get("smtp.reply.code").map(String::as_str) == Some("554")
            })
    });
    // Span kinds (OpenTelemetry semantic conventions 1.28): SMTP sessions
    // and transactions are servers, the publish a producer, delivery's
    // consume a consumer, storage's call a client then a server, an
    // attempt at a remote MX a client.
    for (name, service, kind) in [
        ("smtp.session", "correu-ingress", "SERVER"),
        ("smtp.transaction", "correu-ingress", "SERVER"),
        ("queue.publish", "correu-ingress", "PRODUCER"),
        ("delivery.message", "correu-delivery", "CONSUMER"),
        ("storage.deliver", "correu-delivery", "CLIENT"),
        ("storage.deliver", "correu-storage", "SERVER"),
        ("delivery.attempt", "correu-delivery", "CLIENT"),
    ] {
        let of: Vec<_> = spans
            .iter()
            .filter(|s| s.name == name && s.service == service)
            .collect();
        assert!(!of.is_empty(), "no {name} span from {service}");
        for s in of {
            assert_eq!(s.kind, kind, "{name} from {service}: {s:#?}");
        }
    }
    // Numbers are numbers.
    for (name, attribute) in [
        ("smtp.transaction", "messaging.message.body.size"),
        ("smtp.transaction", "smtp.recipients"),
        ("smtp.transaction", "smtp.reply.code"),
        ("smtp.session", "client.port"),
        ("queue.publish", "messaging.message.body.size"),
        ("delivery.message", "attempt"),
        ("delivery.attempt", "server.port"),
        ("storage.deliver", "rpc.grpc.status_code"),
    ] {
        let s = spans
            .iter()
            .find(|s| s.name == name && s.attributes.contains_key(attribute))
            .unwrap_or_else(|| panic!("{name} with {attribute}: {spans:#?}"));
        assert_eq!(
            s.attribute_types.get(attribute).copied(),
            Some("int"),
            "{name}.{attribute}: {s:#?}"
        );
    }
    // The refusal at DATA is its transaction's error, with the reply.
    let refusal = spans
        .iter()
        .find(|s| {
            s.name == "smtp.transaction"
                && s.attributes.get("smtp.reply.code").map(String::as_str) == Some("554")
        })
        .unwrap();
    assert_eq!(refusal.status, "ERROR");
    assert!(refusal.status_message.starts_with("554"), "{refusal:#?}");

    // The local message: one trace from SMTP to the mailbox.
    let tx: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "smtp.transaction" && s.attributes.get("queue_id") == Some(&local))
        .collect();
    assert_eq!(tx.len(), 1, "one transaction span: {spans:#?}");
    let tx = tx[0];
    let trace = tx.trace_id.clone();
    assert!(
        tx.parent_span_id.is_empty(),
        "the transaction starts the trace"
    );
    assert_eq!(tx.service, "correu-ingress");
    assert_eq!(
        tx.attributes.get("smtp.reply.code").map(String::as_str),
        Some("250")
    );
    let session = spans
        .iter()
        .find(|s| s.name == "smtp.session" && s.trace_id != trace)
        .expect("the session's own span");
    assert!(
        tx.links.contains(&session.trace_id),
        "the transaction links to its session"
    );
    let publish = in_trace(&spans, &trace, "queue.publish");
    assert_eq!(publish.len(), 1);
    assert_eq!(publish[0].parent_span_id, tx.span_id);
    assert_eq!(
        publish[0]
            .attributes
            .get("messaging.system")
            .map(String::as_str),
        Some("rabbitmq")
    );
    let processed = in_trace(&spans, &trace, "delivery.message");
    assert_eq!(processed.len(), 1);
    assert_eq!(processed[0].service, "correu-delivery");
    assert_eq!(processed[0].parent_span_id, publish[0].span_id);
    let stores = in_trace(&spans, &trace, "storage.deliver");
    let client = stores
        .iter()
        .find(|s| s.service == "correu-delivery")
        .unwrap();
    let server = stores
        .iter()
        .find(|s| s.service == "correu-storage")
        .unwrap();
    assert_eq!(client.parent_span_id, processed[0].span_id);
    assert_eq!(
        server.parent_span_id, client.span_id,
        "gRPC carried the context"
    );
    for s in [tx, publish[0], processed[0], *client, *server] {
        assert_eq!(
            s.attributes.get("queue_id"),
            Some(&local),
            "{} carries the queue id",
            s.name
        );
    }
    assert_eq!(
        server.attributes.get("rpc.method").map(String::as_str),
        Some("Deliver")
    );
    // No address in any span (telemetry.span_addresses is off).
    for s in spans.iter().filter(|s| s.trace_id == trace) {
        for v in s.attributes.values() {
            assert!(!v.contains("pere@") && !v.contains("jo@"), "{s:?}");
        }
    }

    // The retried message: both attempts in its trace, each under the
    // same publish, the first deferred by the MX's 451.
    let tx = spans
        .iter()
        .find(|s| s.name == "smtp.transaction" && s.attributes.get("queue_id") == Some(&relayed))
        .unwrap();
    let attempts = in_trace(&spans, &tx.trace_id, "delivery.message");
    let numbers: Vec<&str> = attempts
        .iter()
        .filter_map(|s| s.attributes.get("attempt").map(String::as_str))
        .collect();
    assert!(
        numbers.contains(&"1") && numbers.contains(&"2"),
        "both attempts in one trace: {numbers:?}"
    );
    let tries = in_trace(&spans, &tx.trace_id, "delivery.attempt");
    let codes: Vec<&str> = tries
        .iter()
        .filter_map(|s| s.attributes.get("smtp.reply.code").map(String::as_str))
        .collect();
    assert!(
        codes.contains(&"451"),
        "the deferral is on its attempt: {tries:#?}"
    );
    // The deferred attempt and its message are errors; the delivered ones
    // are not.
    let deferred = tries
        .iter()
        .find(|s| s.attributes.get("smtp.reply.code").map(String::as_str) == Some("451"))
        .unwrap();
    assert_eq!(deferred.status, "ERROR", "{deferred:#?}");
    assert!(deferred.status_message.contains("4.3.0"), "{deferred:#?}");
    for s in &attempts {
        let first = s.attributes.get("attempt").map(String::as_str) == Some("1");
        assert_eq!(s.status, if first { "ERROR" } else { "UNSET" }, "{s:#?}");
    }
    assert!(
        tries.iter().any(|s| s.status == "UNSET"),
        "the second attempt succeeded: {tries:#?}"
    );
    for s in spans.iter().filter(|s| s.trace_id == trace) {
        assert_eq!(s.status, "UNSET", "the local message had no error: {s:#?}");
    }

    // Logs carry the trace id with the queue id, and the id of the span
    // they were written in, as top-level fields.
    let log = delivery.output();
    let line = log
        .lines()
        .find(|l| l.contains(&local) && l.contains("\"message\":\"delivered\""))
        .unwrap_or_else(|| panic!("the delivery log line of {local}:\n{log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["trace_id"], trace.as_str(), "{line}");
    let span_id = line["span_id"].as_str().unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == trace && s.span_id == span_id),
        "the line's span_id names a span of its trace: {line}"
    );
    drop(ingress);
    drop(delivery);
    drop(storage);
}

/// Metric values by series (`name{labels}` as Prometheus writes it).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[test]
fn metrics_and_health_move_with_the_mail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("correu.toml");
    std::fs::write(
        &cfg,
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 100000\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\nmailboxes = [\"pere@localhost\"]\n[queue]\nspool = \"queue\"\n",
    )
    .unwrap();
    let mut serve = Proc::correu(CORREU, "serve", dir.path(), &["serve"], &cfg);
    let smtp = serve.serve_smtp_addr();
    let health: SocketAddr = serve
        .wait_for("  health ", Duration::from_secs(10))
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(http_get(health, "/livez").0, 200);
    let (status, body) = http_get(health, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_get(health, "/nothing").0, 404);
    // The container HEALTHCHECK's probe says the same.
    let (st, _, err) = run(CORREU, &["probe", &format!("http://{health}/readyz")]);
    assert!(st.success(), "{err}");
    let (st, _, err) = run(CORREU, &["probe", &format!("http://{health}/nothing")]);
    assert!(!st.success() && err.contains("404"), "{err}");
    let closed_port = ClosedPort::new();
    let closed = format!("http://127.0.0.1:{}/readyz", closed_port.port);
    assert!(!run(CORREU, &["probe", &closed]).0.success());

    let accepted = "correu_smtp_transactions_total{reply_class=\"2xx\",result=\"accepted\"}";
    let delivered = "correu_delivery_attempts_total{destination=\"local\",outcome=\"delivered\"}";
    let sizes = "correu_smtp_message_size_bytes_count";
    let before = scrape(health);
    for i in 0..3 {
        send(smtp, &["pere@localhost"], &format!("m{i}"));
    }
    // A refused recipient is not a transaction; a message over the size
    // limit (100,000 bytes here) is a rejected one.
    let mut c = Smtp::connect(smtp);
    c.read();
    c.cmd("EHLO client.example");
    c.cmd("MAIL FROM:<jo@domini.com>");
    assert_eq!(c.cmd("RCPT TO:<nobody@localhost>").code, 550);
    c.cmd("RSET");
    let big = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(98)).repeat(1500)
    );
    assert_eq!(
        c.send_mail("jo@domini.com", &["pere@localhost"], &big).code,
        552
    );
    c.cmd("QUIT");
    wait_maildir(
        &dir.path().join("mail/localhost/pere"),
        3,
        Duration::from_secs(30),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let m = scrape(health);
        if value(&m, delivered) - value(&before, delivered) >= 3.0
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(value(&after, accepted) - value(&before, accepted), 3.0);
    let too_big = "correu_smtp_transactions_total{reply_class=\"5xx\",result=\"rejected\"}";
    assert_eq!(value(&after, too_big) - value(&before, too_big), 1.0);
    assert_eq!(value(&after, delivered) - value(&before, delivered), 3.0);
    assert_eq!(value(&after, sizes) - value(&before, sizes), 3.0);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("correu_queue_publish_duration_seconds_bucket")),
        "publish latency histogram: {after:?}"
    );
    assert!(
        value(&after, "correu_smtp_connections_accepted_total")
            - value(&before, "correu_smtp_connections_accepted_total")
            >= 4.0
    );
    // No address, name or queue id in a label.
    let (_, text) = http_get(health, "/metrics");
    assert!(!text.contains("pere@") && !text.contains("jo@"), "{text}");

    // It stops cleanly on SIGTERM.
    serve.signal("TERM");
    let status = serve.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", serve.output());
}

/// Every metric the Grafana dashboard charts and the alert rules use
/// (`helm/tests/metrics_used.txt`, which the chart's test derives from the
/// dashboard and the rendered PrometheusRule and keeps current) is in a
/// scrape of the four services at start-up, before any mail: counters at
/// zero, histograms empty. Each service also exports the process's own
/// metrics.
#[test]
fn every_metric_the_dashboard_and_alerts_use_is_scraped_at_start_up() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let used = read(&root.join("helm/tests/metrics_used.txt"));
    let used: Vec<&str> = used.lines().filter(|l| !l.is_empty()).collect();
    assert!(used.len() >= 20, "{used:?}");
    let dir = tempfile::tempdir().unwrap();
    let vhost = Vhost::create("metrics");
    let redis = RedisPrefix::new("metrics");
    let base = format!(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{}\"\n[queue]\nbackend = \"rabbitmq\"\nurl = \"{}\"\n[telemetry]\nlisten = \"127.0.0.1:0\"\n[webhook]\nurls = [\"http://127.0.0.1:9/hook\"]\n{}",
        dir.path().join("mail").display(),
        vhost.url(RABBITMQ.parse().unwrap()),
        redis.section(),
    );
    let (mut storage, cfg) = storage_first(dir.path(), &base, |role, cfg| {
        Proc::correu(CORREU, role, dir.path(), &[role], cfg)
    });
    let mut delivery = Proc::correu(CORREU, "delivery", dir.path(), &["delivery"], &cfg);
    delivery.wait_for("delivery consuming", Duration::from_secs(20));
    let mut ingress = Proc::correu(CORREU, "ingress", dir.path(), &["ingress"], &cfg);
    ingress.listening("SMTP listening");
    let mut webhook = Proc::correu(CORREU, "webhook", dir.path(), &["webhook"], &cfg);
    webhook.wait_for("webhook running", Duration::from_secs(20));

    let mut all = std::collections::HashSet::new();
    for (role, p) in [
        ("storage", &mut storage),
        ("delivery", &mut delivery),
        ("ingress", &mut ingress),
        ("webhook", &mut webhook),
    ] {
        let addr = p.listening("telemetry listening");
        // A histogram is named by its base (`x` for `x_bucket`).
        let mut names = std::collections::HashSet::new();
        for series in scrape(addr).keys() {
            let name = series.split('{').next().unwrap().to_string();
            if let Some(base) = name.strip_suffix("_bucket") {
                names.insert(base.to_string());
            }
            names.insert(name);
        }
        for process in [
            "process_cpu_time_seconds_total",
            "process_memory_usage_bytes",
            "process_open_file_descriptor_count",
            "correu_runtime_tasks",
        ] {
            assert!(
                names.contains(process),
                "{role} exports {process}: {names:?}"
            );
        }
        all.extend(names);
    }
    for name in used {
        assert!(
            all.contains(name),
            "{name} (charted or alerted on) is in no service's scrape at start-up: {all:?}"
        );
    }
}

/// OpenTelemetry's standard variables: with an endpoint, traces, metrics
/// and logs are pushed (log records with the trace and span of the span
/// they were written in), with `OTEL_EXPORTER_OTLP_HEADERS`' headers;
/// `OTEL_TRACES_EXPORTER=none`, `OTEL_METRICS_EXPORTER=none` and
/// `OTEL_LOGS_EXPORTER=none` turn each off though the endpoint is set (a
/// platform team's way of scraping `/metrics` and collecting standard
/// error instead); `OTEL_TRACES_SAMPLER=traceidratio` with
/// `OTEL_TRACES_SAMPLER_ARG=0` samples no trace.
#[test]
fn otel_exporter_none_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run_serve = |name: &str, receiver: &OtlpReceiver, extra: &[(&str, &str)]| {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"{name}-mail\"\n[queue]\nspool = \"{name}-queue\"\n[telemetry]\nlisten = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap();
        let endpoint = receiver.endpoint();
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ];
        env.extend_from_slice(extra);
        let mut p = Proc::spawn(
            name,
            dir.path(),
            CORREU,
            &["serve", "--config", cfg.to_str().unwrap()],
            &env,
        );
        let addr = p.serve_smtp_addr();
        let id = send(addr, &["jo@localhost"], name);
        wait_maildir(
            &dir.path().join(format!("{name}-mail/localhost/jo")),
            1,
            Duration::from_secs(20),
        );
        (p, id)
    };

    let pushed = OtlpReceiver::start();
    let (_on, id) = run_serve(
        "on",
        &pushed,
        &[("OTEL_EXPORTER_OTLP_HEADERS", "x-correu-tenant=mail-team")],
    );
    let spans = pushed.wait(Duration::from_secs(20), |s| !s.is_empty());
    assert!(!spans.is_empty(), "spans are pushed by default");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (pushed.metric_exports() == 0 || !pushed.logs().iter().any(|l| l.body == "delivered"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pushed.metric_exports() > 0, "metrics are pushed by default");
    assert!(
        pushed
            .headers()
            .contains(&("x-correu-tenant".into(), "mail-team".into())),
        "OTEL_EXPORTER_OTLP_HEADERS: {:?}",
        pushed.headers()
    );
    let logs = pushed.logs();
    let delivered = logs
        .iter()
        .find(|l| l.body == "delivered" && l.attributes.get("queue_id") == Some(&id))
        .unwrap_or_else(|| panic!("the delivered log record of {id}: {logs:#?}"));
    assert_eq!(delivered.severity, "INFO");
    assert_eq!(delivered.service, "correu");
    let spans = pushed.spans();
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == delivered.trace_id && s.span_id == delivered.span_id),
        "the record names the span it was written in: {delivered:#?}"
    );

    let quiet = OtlpReceiver::start();
    let _off = run_serve(
        "off",
        &quiet,
        &[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ],
    );
    let unsampled = OtlpReceiver::start();
    let _ratio = run_serve(
        "ratio",
        &unsampled,
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    // Several export intervals and batch delays go by.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        quiet.spans().len(),
        0,
        "no span with OTEL_TRACES_EXPORTER=none"
    );
    assert_eq!(
        quiet.metric_exports(),
        0,
        "no metrics with OTEL_METRICS_EXPORTER=none"
    );
    assert_eq!(
        quiet.logs().len(),
        0,
        "no logs with OTEL_LOGS_EXPORTER=none"
    );
    assert_eq!(unsampled.spans().len(), 0, "a ratio of 0 samples nothing");
    assert!(
        !unsampled.logs().is_empty(),
        "logs go on without sampled traces"
    );
}

/// Without any exporter, every log line written inside a span still
/// carries top-level `trace_id` and `span_id`, and the lines of one
/// message, from ingress's `queued` to delivery's `delivered`, share its
/// trace id: logs alone can be joined.
#[test]
fn log_lines_carry_trace_and_span_ids_without_an_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[storage]\nlisten = \"127.0.0.1:0\"\nroot = \"mail\"\n[queue]\nspool = \"queue\"\n",
    )
    .unwrap();
    // Ingress's "queued" is a debug line (one line per message at info).
    let mut serve = Proc::spawn(
        "a",
        dir.path(),
        CORREU,
        &["serve", "--config", cfg.to_str().unwrap()],
        &[("CORREU_LOG", "info,correu_ingress=debug")],
    );
    let smtp = serve.serve_smtp_addr();
    let id = send(smtp, &["pere@localhost"], "ids");
    let delivered =
        serve.wait_for_line(&["\"message\":\"delivered\"", &id], Duration::from_secs(20));
    let delivered: serde_json::Value = serde_json::from_str(&delivered).unwrap();
    let queued = serve
        .output()
        .lines()
        .find(|l| l.contains(&id) && l.contains("\"message\":\"queued\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap_or_else(|| panic!("the queued line of {id}"));
    let hex = |v: &serde_json::Value, len: usize| {
        v.as_str()
            .is_some_and(|s| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit()))
    };
    for line in [&queued, &delivered] {
        assert!(hex(&line["trace_id"], 32), "{line}");
        assert!(hex(&line["span_id"], 16), "{line}");
    }
    assert_eq!(
        queued["trace_id"], delivered["trace_id"],
        "one trace per message"
    );
    assert_ne!(queued["span_id"], delivered["span_id"], "different spans");
}
