//! `correu mailbox`: list and show messages through storage's gRPC API.

use std::io::Write;

use clap::Subcommand;
use correu_proto::v1::{GetMessageRequest, ListMessagesRequest};
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
    }
    Ok(())
}
