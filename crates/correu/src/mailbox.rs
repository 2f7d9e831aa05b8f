//! `correu mailbox`: list and show messages through storage's gRPC API.

use std::io::Write;

use clap::Subcommand;
use correu_proto::v1::{
    DeleteMessageRequest, GetMessageRequest, ListMessagesRequest, MailboxStatsRequest,
};
use correu_runtime::Config;

#[derive(Subcommand)]
pub enum Action {
    /// The messages of a mailbox, newest first.
    List {
        address: String,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One message, as stored, to standard output.
    Show { address: String, id: String },
    /// Remove one message.
    Delete { address: String, id: String },
    /// How many messages and bytes, and the quota.
    Stats { address: String },
}

pub async fn run(cfg: Config, action: Action) -> anyhow::Result<()> {
    let mut client = correu_storage::client::connect(&cfg.storage, &cfg.storage.endpoint)?;
    match action {
        Action::List { address, limit } => {
            let resp = client
                .list_messages(ListMessagesRequest {
                    address: address.clone(),
                    page_size: limit,
                    page_token: String::new(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", cfg.storage.endpoint, s.message()))?
                .into_inner();
            if resp.messages.is_empty() {
                println!("{address}: no messages");
            }
            for m in resp.messages {
                let when =
                    correu_smtp::headers::rfc5322_date(m.received_at_unix_micros / 1_000_000);
                let flags = if m.flags.is_empty() {
                    "new".to_string()
                } else {
                    m.flags
                };
                println!("{}  {:>8}  {:<5}  {}", when, m.size, flags, m.id);
            }
        }
        Action::Show { address, id } => {
            let mut stream = client
                .get_message(GetMessageRequest { address, id })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await? {
                out.write_all(&chunk.data)?;
            }
            out.flush()?;
        }
        Action::Delete { address, id } => {
            client
                .delete_message(DeleteMessageRequest {
                    address: address.clone(),
                    id: id.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("{address}: {id} deleted");
        }
        Action::Stats { address } => {
            let s = client
                .mailbox_stats(MailboxStatsRequest {
                    address: address.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let quota = match s.quota_bytes {
                0 => "no quota".to_string(),
                q => format!("quota {q} bytes"),
            };
            println!(
                "{address}: {} messages, {} bytes, {quota}",
                s.messages, s.bytes
            );
        }
    }
    Ok(())
}
