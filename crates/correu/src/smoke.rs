//! `correu smoke-test`: one message through a running Correu, end to end.
//! SMTP to ingress, then storage's API until the mailbox has it, then it
//! is deleted again. `helm test` runs it in a pod of its own.

use std::time::{Duration, Instant};

use clap::Args;
use correu_proto::v1::{DeleteMessageRequest, ListMessagesRequest};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::{code, reply};

#[derive(Args, Clone)]
pub struct SmokeArgs {
    /// Ingress's SMTP address (`host:port`).
    #[arg(long)]
    smtp: String,
    /// Storage's gRPC endpoint (`http://host:2526`).
    #[arg(long)]
    storage: String,
    /// A local recipient (storage must accept it).
    #[arg(long)]
    to: String,
    /// The envelope sender; default `smoke-test@` the recipient's domain.
    #[arg(long)]
    from: Option<String>,
    /// How long the message may take to reach the mailbox.
    #[arg(long, default_value = "60s")]
    timeout: correu_runtime::config::Dur,
}

pub async fn run(a: SmokeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + a.timeout.get();
    let domain = a.to.rsplit_once('@').map(|(_, d)| d).unwrap_or("invalid");
    let from = a
        .from
        .clone()
        .unwrap_or_else(|| format!("smoke-test@{domain}"));
    // Unique enough to find this message among others: the time and pid.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let token = format!("{:x}.{}", now.as_nanos(), std::process::id());
    let queue_id = send(&a.smtp, &from, &a.to, &token, deadline).await?;
    println!(
        "sent: {} accepted it as {queue_id} in {} ms",
        a.smtp,
        started.elapsed().as_millis()
    );
    let mut storage = correu_storage::client::connect(
        &correu_runtime::config::StorageConfig::default(),
        &a.storage,
    )?;
    loop {
        let listed = storage
            .list_messages(ListMessagesRequest {
                address: a.to.clone(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await;
        match listed {
            Ok(r) => {
                if let Some(m) = r
                    .into_inner()
                    .messages
                    .into_iter()
                    .find(|m| m.id.contains(&queue_id))
                {
                    println!(
                        "stored: {} has it as {} ({} bytes) after {} ms",
                        a.to,
                        m.id,
                        m.size,
                        started.elapsed().as_millis()
                    );
                    storage
                        .delete_message(DeleteMessageRequest {
                            address: a.to.clone(),
                            id: m.id.clone(),
                        })
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("stored, but cannot delete it: {}", s.message())
                        })?;
                    println!("deleted: {}", m.id);
                    return Ok(());
                }
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::InvalidArgument
                ) =>
            {
                anyhow::bail!("storage: {}: {}", a.to, s.message())
            }
            // Storage restarting, or not reachable yet: ask again.
            Err(s) => eprintln!("storage: {:?}: {}", s.code(), s.message()),
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{queue_id} was accepted but is not in {}'s mailbox after {:?}",
                a.to,
                a.timeout.get()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends one message; the queue id from the `250`.
async fn send(
    server: &str,
    from: &str,
    to: &str,
    token: &str,
    deadline: Instant,
) -> anyhow::Result<String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let stream = tokio::time::timeout(left, TcpStream::connect(server))
        .await
        .map_err(|_| anyhow::anyhow!("{server}: no connection within {left:?}"))?
        .map_err(|e| anyhow::anyhow!("{server}: {e}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut step = async |say: Option<&str>, want: &str| -> anyhow::Result<String> {
        if let Some(line) = say {
            wr.write_all(line.as_bytes()).await?;
        }
        let r = reply(&mut rd).await?;
        if code(&r) != want {
            let what = say.map(str::trim_end).unwrap_or("the greeting");
            anyhow::bail!("{server}: {what}: {}", r.trim_end());
        }
        Ok(r)
    };
    step(None, "220").await?;
    step(Some("EHLO smoke-test.invalid\r\n"), "250").await?;
    step(Some(&format!("MAIL FROM:<{from}>\r\n")), "250").await?;
    step(Some(&format!("RCPT TO:<{to}>\r\n")), "250").await?;
    step(Some("DATA\r\n"), "354").await?;
    let message = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: Correu smoke test {token}\r\nMessage-ID: <{token}@smoke-test.invalid>\r\nDate: {}\r\n\r\nOne message through ingress and storage; it deletes itself.\r\n.\r\n",
        correu_smtp::headers::rfc5322_date(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        )
    );
    let end = step(Some(&message), "250").await?;
    let _ = step(Some("QUIT\r\n"), "221").await;
    end.split("queued as ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{server}: no queue id in {}", end.trim_end()))
}
