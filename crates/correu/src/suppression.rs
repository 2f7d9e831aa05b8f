//! `correu suppression list|add|remove`: the recipients delivery refuses at
//! once after a hard bounce (`[delivery.suppression]`), in Redis when
//! `redis.url` is set, else in `correu serve`'s spool.

use clap::Subcommand;
use correu_delivery::suppression::Suppressions;
use correu_runtime::Config;

#[derive(Subcommand)]
pub enum Action {
    /// Every suppressed recipient, with its class, when it expires and why.
    List {
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Suppress a recipient by hand (for `delivery.suppression.ttl`, or
    /// --ttl), as a sender does with an unsubscribe or a complaint.
    Add {
        address: String,
        #[arg(long, default_value = "manual")]
        reason: String,
        /// How long, like `30d` or `12h`; the configured TTL by default.
        #[arg(long)]
        ttl: Option<correu_runtime::config::Dur>,
    },
    /// Take a recipient off the list.
    Remove { address: String },
}

pub async fn run(cfg: Config, action: Action) -> anyhow::Result<()> {
    let redis = correu_runtime::redis::pool(&cfg.redis)?;
    let Some(list) = Suppressions::open(&cfg, redis, true) else {
        anyhow::bail!("no suppression list");
    };
    match action {
        Action::List { limit } => {
            let entries = list.list(limit).await?;
            println!("{} suppressed recipient(s)", entries.len());
            for e in entries {
                println!(
                    "{}  {}  {}  expires {}  {}",
                    e.address,
                    e.class,
                    e.status,
                    correu_smtp::headers::rfc3339(e.expires as i64),
                    e.reason
                );
            }
        }
        Action::Add {
            address,
            reason,
            ttl,
        } => {
            if !address.contains('@') {
                anyhow::bail!("{address:?} is not an address (local@domain)");
            }
            let mut e = list.entry(&address, "manual", "5.7.1", &reason);
            if let Some(ttl) = ttl {
                e.expires = e.added + ttl.get().as_secs();
            }
            list.add(&e).await?;
            println!(
                "{} suppressed until {}",
                e.address,
                correu_smtp::headers::rfc3339(e.expires as i64)
            );
        }
        Action::Remove { address } => {
            if list.remove(&address).await? {
                println!("{} removed", address.to_lowercase());
            } else {
                anyhow::bail!("{} is not on the suppression list", address.to_lowercase());
            }
        }
    }
    Ok(())
}
