//! The `correu` command.
//!
//! - `correu serve`: ingress, delivery and storage in one process with an
//!   embedded durable queue: nothing else to install.
//! - `correu ingress|delivery|storage`: one service, as in Kubernetes.
//! - `correu check-config FILE`: every configuration error, with its key.
//! - `correu queue [status|list|retry|delete|requeue]`: where is my mail?
//! - `correu mailbox list|show`: read mailboxes through storage's gRPC API.
#![forbid(unsafe_code)]

mod mailbox;
mod queue;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use correu_runtime::cli::{EXIT_CONFIG, run_with};

#[derive(Parser)]
#[command(name = "correu", version, about = "Correu, a mail transfer system")]
struct Cli {
    /// Configuration file (TOML). Every key has a default; `CORREU_…`
    /// variables override it.
    #[arg(short, long, global = true, env = "CORREU_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process (SMTP on 127.0.0.1:2525 by default).
    Serve,
    /// Run the SMTP ingress service alone (needs RabbitMQ and storage).
    Ingress,
    /// Run the delivery service alone (needs RabbitMQ and storage).
    Delivery,
    /// Run the storage service alone.
    Storage,
    /// Check a configuration file and print every error with its key.
    CheckConfig {
        /// The file to check (with `CORREU_…` variables applied).
        file: PathBuf,
    },
    /// Print an argon2 hash of a password read from standard input, for
    /// the `smtp.auth_file` accounts (`address:HASH` lines).
    HashPassword,
    /// Where is my mail: queue counts, deferred messages, and actions.
    Queue {
        #[command(subcommand)]
        action: Option<queue::Action>,
    },
    /// Read mailboxes through the storage service.
    Mailbox {
        #[command(subcommand)]
        action: mailbox::Action,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.clone();
    match cli.command {
        Command::Serve => with_config(path, "correu", serve::serve),
        Command::Ingress => with_config(path, "correu-ingress", correu_ingress::standalone),
        Command::Delivery => with_config(path, "correu-delivery", correu_delivery::standalone),
        Command::Storage => with_config(path, "correu-storage", correu_storage::standalone),
        Command::CheckConfig { file } => {
            match correu_runtime::Config::load(Some(&file), std::env::vars()) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("{}: {e}", file.display());
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::HashPassword => {
            let mut password = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut password) {
                eprintln!("cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
            let password = password.trim_end_matches(['\r', '\n']);
            match correu_ingress::auth::hash_password(password) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot hash: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Queue { action } => {
            with_config(path, "correu", move |cfg, _| queue::run(cfg, action))
        }
        Command::Mailbox { action } => {
            with_config(path, "correu", move |cfg, _| mailbox::run(cfg, action))
        }
    }
}

/// Runs `f` with the configuration from `path`.
fn with_config<F, Fut>(path: Option<PathBuf>, name: &'static str, f: F) -> ExitCode
where
    F: FnOnce(correu_runtime::Config, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    match correu_runtime::cli::load(path.as_deref()) {
        Ok(cfg) => run_with(name, cfg, f),
        Err(code) => code,
    }
}
