//! The `correu` command.
//!
//! - `correu serve`: ingress, delivery and storage in one process with an
//!   embedded durable queue: nothing else to install.
//! - `correu ingress|delivery|storage`: one service, as in Kubernetes.
//! - `correu check-config FILE`: every configuration error, with its key.
//! - `correu queue [status|list|retry|delete|requeue]`: where is my mail?
//! - `correu mailbox list|show|delete|stats`: mailboxes through storage's gRPC API.
//! - `correu account|alias`: edit storage's accounts and aliases files.
//! - `correu webhook`: delivery events posted to a sender's URLs.
//! - `correu suppression list|add|remove`: recipients refused after a hard bounce.
//! - `correu tls-report show|send`: TLS reports (RFC 8460).
//! - `correu bench`: an SMTP load generator.
//! - `correu smoke-test`: one message through ingress into storage (`helm test`).
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: correu_runtime::Allocator = correu_runtime::Allocator;

mod account;
mod bench;
mod mailbox;
mod queue;
mod serve;
mod smoke;
mod suppression;
mod tls_report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use correu_runtime::cli::{EXIT_CONFIG, run_command, run_with};
use correu_runtime::config::Role;

#[derive(Parser)]
#[command(name = "correu", version, about = "Correu, a mail transfer system")]
struct Cli {
    /// Configuration file (TOML). Every key has a default; `CORREU_…`
    /// variables override it.
    #[arg(short, long, global = true, env = "CORREU_CONFIG")]
    config: Option<PathBuf>,
    /// Operator commands (queue, mailbox, account, alias) log warnings
    /// and errors only; -v adds info, -vv debug, -vvv trace. Services log
    /// as CORREU_LOG says.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DkimAction {
    /// Make a key pair: the private key goes to FILE (PEM), the TXT record
    /// to publish at SELECTOR._domainkey.DOMAIN is printed.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long, default_value = "correu")]
        selector: String,
        /// rsa-sha256 (2048 bits) or ed25519-sha256.
        #[arg(long, default_value = "rsa-sha256")]
        algorithm: String,
        /// Where the private key goes (made 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace a key that is already there (without it, an existing
        /// file is left alone and the command fails).
        #[arg(long)]
        force: bool,
    },
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
    /// Run the webhook service alone: delivery events posted to
    /// `webhook.urls` (needs RabbitMQ).
    Webhook,
    /// Check a configuration file and print every error with its key.
    CheckConfig {
        /// The file to check (with `CORREU_…` variables applied).
        file: PathBuf,
        /// Check it as this role would at its start: serve (everything),
        /// ingress, delivery, storage, webhook, or admin (the operator's commands).
        #[arg(long, default_value = "serve")]
        role: Role,
        /// Print the whole configuration, every key with the value it
        /// takes (defaults included), as TOML.
        #[arg(long)]
        show: bool,
    },
    /// Print an argon2 hash of a password read from standard input, for an
    /// accounts file (`address:HASH` lines; `correu account add` does it all).
    HashPassword,
    /// Where is my mail: queue counts, deferred messages, and actions.
    Queue {
        #[command(subcommand)]
        action: Option<queue::Action>,
    },
    /// DKIM keys: `correu dkim keygen` prints a private key and the DNS record.
    Dkim {
        #[command(subcommand)]
        action: DkimAction,
    },
    /// Read mailboxes through the storage service.
    Mailbox {
        #[command(subcommand)]
        action: mailbox::Action,
    },
    /// Accounts in storage.accounts_file: add, passwd, del, list.
    Account {
        #[command(subcommand)]
        action: account::AccountAction,
    },
    /// Recipients refused at once after a hard bounce: list, add, remove.
    Suppression {
        #[command(subcommand)]
        action: suppression::Action,
    },
    /// TLS reports (RFC 8460): show a day's, or send them now.
    TlsReport {
        #[command(subcommand)]
        action: tls_report::Action,
    },
    /// Aliases in storage.aliases_file: add, del, list.
    Alias {
        #[command(subcommand)]
        action: account::AliasAction,
    },
    /// Load an SMTP server: messages/s, DATA-end → 250 latency, errors.
    Bench(bench::BenchArgs),
    /// Send one message through ingress and wait until storage has it,
    /// then delete it (what `helm test` runs): exit 0 when it arrived.
    SmokeTest(smoke::SmokeArgs),
    /// Ask a health endpoint (`/livez`, `/readyz`): exit 0 on 200, else 1.
    /// For container HEALTHCHECKs, where there is no curl.
    Probe {
        #[arg(default_value = "http://127.0.0.1:9725/readyz")]
        url: String,
    },
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    let path = cli.config.clone();
    let verbose = cli.verbose;
    match cli.command {
        Command::Serve => with_config(path, "correu", Role::Serve, serve::serve),
        Command::Ingress => with_config(
            path,
            "correu-ingress",
            Role::Ingress,
            correu_ingress::standalone,
        ),
        Command::Delivery => with_config(
            path,
            "correu-delivery",
            Role::Delivery,
            correu_delivery::standalone,
        ),
        Command::Storage => with_config(
            path,
            "correu-storage",
            Role::Storage,
            correu_storage::standalone,
        ),
        Command::Webhook => with_config(
            path,
            "correu-webhook",
            Role::Webhook,
            correu_webhook::standalone,
        ),
        Command::CheckConfig { file, role, show } => {
            match correu_runtime::Config::load(Some(&file), std::env::vars(), role) {
                Ok(cfg) if show => match cfg.to_toml() {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("cannot write the configuration as TOML: {e}");
                        ExitCode::FAILURE
                    }
                },
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
        Command::Queue { action } => admin(path, verbose, move |cfg| queue::run(cfg, action)),
        Command::Dkim {
            action:
                DkimAction::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                    force,
                },
        } => dkim_keygen(&domain, &selector, &algorithm, &out, force),
        Command::Mailbox { action } => admin(path, verbose, move |cfg| mailbox::run(cfg, action)),
        Command::Account { action } => {
            admin(path, verbose, move |cfg| account::account(cfg, action))
        }
        Command::Suppression { action } => {
            admin(path, verbose, move |cfg| suppression::run(cfg, action))
        }
        Command::TlsReport { action } => {
            admin(path, verbose, move |cfg| tls_report::run(cfg, action))
        }
        Command::Alias { action } => admin(path, verbose, move |cfg| account::alias(cfg, action)),
        Command::Probe { url } => probe(&url),
        Command::SmokeTest(args) => run_with(
            "correu-smoke-test",
            correu_runtime::Config::default(),
            move |_, _| smoke::run(args),
        ),
        Command::Bench(args) => run_with(
            "correu-bench",
            correu_runtime::Config::default(),
            move |_, stop| bench::run(args, stop),
        ),
    }
}

/// GET `http://HOST:PORT/PATH`; success on a 200 within 5 seconds.
fn probe(url: &str) -> ExitCode {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("probe: {url}: only http:// URLs");
        return ExitCode::from(EXIT_CONFIG);
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let result = (|| -> std::io::Result<String> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let timeout = std::time::Duration::from_secs(5);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })();
    match result {
        Ok(out) if out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200") => {
            ExitCode::SUCCESS
        }
        Ok(out) => {
            eprintln!("{url}: {}", out.lines().next().unwrap_or("no answer"));
            if let Some((_, body)) = out.split_once("\r\n\r\n") {
                eprint!("{body}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A TXT record's text as DNS wants it: strings of at most 255 octets
/// each, quoted (RFC 1035 §3.3.14; a 2048-bit RSA key takes two).
fn txt_strings(text: &str) -> String {
    text.as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes writing to a closed pipe (`correu queue list | head`) end the
/// command quietly, as Unix tools do, instead of with a panic message:
/// exit 141, the status of a process SIGPIPE killed.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str().is_some_and(|m| {
            m.starts_with("failed printing to stdout") && m.contains("Broken pipe")
        }) {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// Runs `f` with the configuration from `path`.
fn with_config<F, Fut>(path: Option<PathBuf>, name: &'static str, role: Role, f: F) -> ExitCode
where
    F: FnOnce(correu_runtime::Config, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    match correu_runtime::cli::load(path.as_deref(), role) {
        Ok(cfg) => run_with(name, cfg, f),
        Err(code) => code,
    }
}

/// Runs an operator's command with the configuration from `path`: it
/// logs warnings and errors only, unless `-v` (`verbose`) asks for more.
fn admin<F, Fut>(path: Option<PathBuf>, verbose: u8, f: F) -> ExitCode
where
    F: FnOnce(correu_runtime::Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    match correu_runtime::cli::load(path.as_deref(), Role::Admin) {
        Ok(cfg) => run_command("correu", cfg, verbose, move |cfg, _| f(cfg)),
        Err(code) => code,
    }
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: &str,
    out: &std::path::Path,
    force: bool,
) -> ExitCode {
    use correu_runtime::config::DkimAlgorithm;
    let alg = match algorithm {
        "rsa-sha256" => DkimAlgorithm::RsaSha256,
        "ed25519-sha256" => DkimAlgorithm::Ed25519Sha256,
        other => {
            eprintln!("--algorithm must be rsa-sha256 or ed25519-sha256, not {other:?}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (pem, txt) = match correu_delivery::dkim::keygen(alg) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cannot make a key: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The private key is the owner's alone, and an existing one is never
    // replaced by accident (it may be the one DNS publishes).
    let written = {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut open = std::fs::OpenOptions::new();
        open.write(true).mode(0o600);
        if force {
            open.create(true).truncate(true);
        } else {
            open.create_new(true);
        }
        open.open(out).and_then(|mut f| {
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.write_all(pem.as_bytes())
        })
    };
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            eprintln!(
                "{} exists: not replaced (--force replaces it)",
                out.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        eprintln!("cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "private key written to {}; publish this TXT record:",
        out.display()
    );
    println!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        txt_strings(&txt)
    );
    println!(
        "and configure:\n[delivery.dkim.\"{domain}\"]\nselector = \"{selector}\"\nkey_file = \"{}\"\nalgorithm = \"{algorithm}\"",
        out.display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_txt_records_are_split_into_dns_strings() {
        let key = "x".repeat(392);
        let txt = txt_strings(&key);
        let parts: Vec<&str> = txt.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 255 + 2);
        assert_eq!(parts[1].len(), 392 - 255 + 2);
        assert_eq!(
            txt_strings("v=DKIM1; k=ed25519; p=abc"),
            "\"v=DKIM1; k=ed25519; p=abc\""
        );
    }
}
