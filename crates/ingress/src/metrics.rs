//! Ingress metrics. Labels are closed sets (reasons, reply classes, TLS
//! versions): never an address, a name or a queue id.

use std::sync::LazyLock;

use correu_runtime::metrics::{counter, histogram_u64};

use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};

pub struct IngressMetrics {
    pub connections_open: UpDownCounter<i64>,
    pub connections_accepted: Counter<u64>,
    /// By `reason`: `connection_limit`, `client_limit`, `client_rate`,
    /// `shutting_down`.
    pub connections_refused: Counter<u64>,
    /// Idle sessions closed to make room for a new connection.
    pub sessions_evicted: Counter<u64>,
    /// By `result` (`accepted`, `rejected`) and `reply_class` (`2xx`…).
    pub transactions: Counter<u64>,
    pub message_size: Histogram<u64>,
    /// By `tls.protocol.version` and `result`.
    pub tls_handshakes: Counter<u64>,
    /// Inbound verification, by `method` (`spf.mailfrom`, `spf.helo`,
    /// `dkim`, `arc`, `dmarc`) and `result` (RFC 8601's words).
    pub auth_results: Counter<u64>,
    /// What inbound policy did, by `action` (`accept`, `quarantine`,
    /// `reject`) and `reason` (`pass`, `dmarc`, `spf`, `none`).
    pub auth_actions: Counter<u64>,
    /// Listings found in DNS blocklists, by `zone` (configured zones).
    pub blocklist_hits: Counter<u64>,
    /// Greylisting decisions, by `result` (`deferred`, `passed`, `skipped`).
    pub greylist: Counter<u64>,
    /// Milters that failed (their default action applied), by `milter`.
    pub milter_failures: Counter<u64>,
    /// What milters decided, by `verdict` (`accept`, `quarantine`,
    /// `discard`, `reject`, `tempfail`).
    pub milter_verdicts: Counter<u64>,
}

pub static METRICS: LazyLock<IngressMetrics> = LazyLock::new(|| {
    let m = opentelemetry::global::meter("correu");
    IngressMetrics {
        connections_open: m
            .i64_up_down_counter("correu.smtp.connections.open")
            .with_unit("{connection}")
            .with_description("SMTP connections open now")
            .build(),
        connections_accepted: counter(
            "correu.smtp.connections.accepted",
            "{connection}",
            "SMTP connections accepted",
        ),
        connections_refused: counter(
            "correu.smtp.connections.refused",
            "{connection}",
            "SMTP connections refused, by reason",
        ),
        sessions_evicted: counter(
            "correu.smtp.sessions.evicted",
            "{session}",
            "Idle SMTP sessions closed to make room when every slot was taken",
        ),
        transactions: counter(
            "correu.smtp.transactions",
            "{transaction}",
            "Messages received to the end of DATA, by result and reply class",
        ),
        message_size: histogram_u64(
            "correu.smtp.message.size",
            "By",
            "Size of accepted messages",
            &[
                1024.0,
                4096.0,
                16384.0,
                65536.0,
                262_144.0,
                1_048_576.0,
                4_194_304.0,
                16_777_216.0,
                67_108_864.0,
            ],
        ),
        tls_handshakes: counter(
            "correu.tls.handshakes",
            "{handshake}",
            "TLS handshakes on SMTP, by version and result",
        ),
        auth_results: counter(
            "correu.smtp.auth.results",
            "{result}",
            "Inbound SPF, DKIM, ARC and DMARC results, by method and result",
        ),
        auth_actions: counter(
            "correu.smtp.auth.actions",
            "{message}",
            "What inbound policy did with verified messages, by action and reason",
        ),
        blocklist_hits: counter(
            "correu.smtp.blocklist.hits",
            "{listing}",
            "Clients and domains found in DNS blocklists, by zone",
        ),
        greylist: counter(
            "correu.smtp.greylist",
            "{message}",
            "Greylisting decisions, by result",
        ),
        milter_failures: counter(
            "correu.smtp.milter.failures",
            "{failure}",
            "Milters that could not be asked, by milter",
        ),
        milter_verdicts: counter(
            "correu.smtp.milter.verdicts",
            "{message}",
            "What the milters decided about messages, by verdict",
        ),
    }
});

/// `2xx`, `4xx`, `5xx`.
pub fn reply_class(code: u16) -> &'static str {
    match code / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Makes the instruments now (counters at zero), not at first use.
pub fn init() {
    LazyLock::force(&METRICS);
    METRICS.connections_open.add(0, &[]);
    correu_queue::metrics::init();
}
