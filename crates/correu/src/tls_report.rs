//! `correu tls-report show|send`: the day's TLS reports (RFC 8460,
//! `[delivery.tls_reports]`), counted by the delivery processes in Redis.
//! Delivery sends yesterday's by itself after midnight UTC; `send` sends a
//! day's now (again, if it went already).

use anyhow::Context;
use clap::Subcommand;
use correu_delivery::tlsrpt::{TlsReports, day};
use correu_runtime::Config;
use correu_runtime::config::QueueBackend;

#[derive(Subcommand)]
pub enum Action {
    /// Print each domain's report of a day as JSON (default: today so far).
    Show {
        /// YYYY-MM-DD (UTC).
        #[arg(long)]
        date: Option<String>,
    },
    /// Send a day's reports to the domains that publish `_smtp._tls`
    /// (default: yesterday).
    Send {
        /// YYYY-MM-DD (UTC).
        #[arg(long)]
        date: Option<String>,
    },
}

fn checked(date: Option<String>, default: String) -> anyhow::Result<String> {
    let d = date.unwrap_or(default);
    let b = d.as_bytes();
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    anyhow::ensure!(ok, "--date {d:?}: YYYY-MM-DD");
    Ok(d)
}

pub async fn run(cfg: Config, action: Action) -> anyhow::Result<()> {
    let redis = correu_runtime::redis::pool(&cfg.redis)?;
    if redis.is_none() {
        anyhow::bail!(
            "TLS reports are counted in Redis (redis.url); without it `correu serve` keeps them in its process and sends them itself"
        );
    }
    let Some(reports) = TlsReports::open(&cfg, redis, true) else {
        anyhow::bail!("no TLS reports");
    };
    match action {
        Action::Show { date } => {
            let d = checked(date, day(0))?;
            let all = reports.reports(&d).await?;
            if all.is_empty() {
                println!("no sessions counted on {d}");
            }
            for (domain, report) in all {
                println!("{domain}\n{}", serde_json::to_string_pretty(&report)?);
            }
        }
        Action::Send { date } => {
            let d = checked(date, day(1))?;
            let backend = cfg.queue_backend(QueueBackend::Embedded);
            let queue = correu_queue::Queue::open_for_admin(&cfg.queue, backend)
                .await
                .context("the queue")?;
            let resolver = correu_runtime::dns::resolver(&cfg.dns)?;
            let https = correu_delivery::tls::verified(cfg.delivery.tls_ca_file.as_deref())?;
            let lines = reports.send(&d, &queue, &resolver, &https, false).await?;
            if lines.is_empty() {
                println!("no sessions counted on {d}");
            }
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}
