//! Ingress metrics. Labels are closed sets (reasons, reply classes, TLS
//! versions): never an address, a name or a queue id.

use std::sync::LazyLock;

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
        connections_accepted: m
            .u64_counter("correu.smtp.connections.accepted")
            .with_unit("{connection}")
            .with_description("SMTP connections accepted")
            .build(),
        connections_refused: m
            .u64_counter("correu.smtp.connections.refused")
            .with_unit("{connection}")
            .with_description("SMTP connections refused, by reason")
            .build(),
        sessions_evicted: m
            .u64_counter("correu.smtp.sessions.evicted")
            .with_unit("{session}")
            .with_description("Idle SMTP sessions closed to make room when every slot was taken")
            .build(),
        transactions: m
            .u64_counter("correu.smtp.transactions")
            .with_unit("{transaction}")
            .with_description("Messages received to the end of DATA, by result and reply class")
            .build(),
        message_size: m
            .u64_histogram("correu.smtp.message.size")
            .with_unit("By")
            .with_description("Size of accepted messages")
            .with_boundaries(vec![
                1024.0,
                4096.0,
                16384.0,
                65536.0,
                262_144.0,
                1_048_576.0,
                4_194_304.0,
                16_777_216.0,
                67_108_864.0,
            ])
            .build(),
        tls_handshakes: m
            .u64_counter("correu.tls.handshakes")
            .with_unit("{handshake}")
            .with_description("TLS handshakes on SMTP, by version and result")
            .build(),
        auth_results: m
            .u64_counter("correu.smtp.auth.results")
            .with_unit("{result}")
            .with_description("Inbound SPF, DKIM, ARC and DMARC results, by method and result")
            .build(),
        auth_actions: m
            .u64_counter("correu.smtp.auth.actions")
            .with_unit("{message}")
            .with_description(
                "What inbound policy did with verified messages, by action and reason",
            )
            .build(),
        blocklist_hits: m
            .u64_counter("correu.smtp.blocklist.hits")
            .with_unit("{listing}")
            .with_description("Clients and domains found in DNS blocklists, by zone")
            .build(),
        greylist: m
            .u64_counter("correu.smtp.greylist")
            .with_unit("{message}")
            .with_description("Greylisting decisions, by result")
            .build(),
        milter_failures: m
            .u64_counter("correu.smtp.milter.failures")
            .with_unit("{failure}")
            .with_description("Milters that could not be asked, by milter")
            .build(),
        milter_verdicts: m
            .u64_counter("correu.smtp.milter.verdicts")
            .with_unit("{message}")
            .with_description("What the milters decided about messages, by verdict")
            .build(),
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
