//! What every binary does before its service runs: find the config file,
//! load and check it (exit 64 naming each bad key), start logging, build the
//! runtime and wire SIGTERM to the shutdown token.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::config::Role;

/// Exit code for a configuration error (linkerd and sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// `--config FILE` (or `-c FILE`) from the arguments, else `CORREU_CONFIG`.
pub fn config_path(args: impl IntoIterator<Item = String>) -> Result<Option<PathBuf>, String> {
    let mut args = args.into_iter();
    let Some(a) = args.next() else {
        return Ok(std::env::var_os("CORREU_CONFIG").map(PathBuf::from));
    };
    let path = match a.as_str() {
        "--config" | "-c" => args.next().ok_or_else(|| format!("{a} needs a file"))?,
        other => match other.strip_prefix("--config=") {
            Some(p) => p.to_string(),
            None => {
                return Err(format!(
                    "unexpected argument {other:?}; usage: [--config FILE]"
                ));
            }
        },
    };
    if let Some(extra) = args.next() {
        return Err(format!(
            "unexpected argument {extra:?}; usage: [--config FILE]"
        ));
    }
    Ok(Some(PathBuf::from(path)))
}

/// Loads the configuration from `path` and the environment, checked for
/// `role`, or prints every error and returns the exit code.
pub fn load(path: Option<&std::path::Path>, role: Role) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars(), role).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Runs one service to completion: the whole `main` of a service binary.
pub fn run_service<F, Fut>(name: &'static str, role: Role, service: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let path = match config_path(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match load(path.as_deref(), role) {
        Ok(cfg) => run_with(name, cfg, service),
        Err(code) => code,
    }
}

/// Runs one service with a configuration already loaded and checked.
pub fn run_with<F, Fut>(name: &'static str, cfg: Config, service: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_logging(name, cfg, None, service)
}

/// Runs an operator's command (`correu queue`, `account`, `alias`,
/// `mailbox`): as [`run_with`], but it logs only warnings and errors
/// unless `verbosity` (the count of `-v`) asks for more, and a failure is
/// said once, on standard error, not also as a log line.
pub fn run_command<F, Fut>(name: &'static str, cfg: Config, verbosity: u8, command: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_logging(name, cfg, Some(verbosity), command)
}

/// `verbosity`: `None` for a service (logs as the environment says),
/// `Some(-v count)` for an operator's command.
fn run_logging<F, Fut>(
    name: &'static str,
    cfg: Config,
    verbosity: Option<u8>,
    service: F,
) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let telemetry = match verbosity {
            None => crate::telemetry::init(name),
            Some(v) => crate::telemetry::init_cli(name, v),
        };
        let shutdown = crate::lifecycle::shutdown_on_signals();
        let code = match service(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let why = describe(&e);
                if verbosity.is_none() {
                    tracing::error!(error = %why, "{name} failed");
                }
                eprintln!("{name}: {why}");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown().await;
        code
    });
    // Everything the service owed is done. A blocking task still running
    // (an exporter's name lookup that no DNS answers: a kubelet's
    // resolv.conf with its search domains can take minutes) must not keep
    // the process past its pod's grace period, as dropping the runtime
    // would: it waits for every blocking task.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// An error with its causes, each said once: many error types already
/// print their source in their own message.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn causes_are_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("spool: {0}")]
        struct Spool(#[from] std::io::Error);
        let e = anyhow::Error::from(Spool(std::io::Error::other("no spool at queue")))
            .context("cannot open the queue");
        assert_eq!(
            describe(&e),
            "cannot open the queue: spool: no spool at queue"
        );
    }

    #[test]
    fn finds_the_config_argument() {
        assert_eq!(
            config_path(args(&["--config", "a.toml"])),
            Ok(Some("a.toml".into()))
        );
        assert_eq!(
            config_path(args(&["-c", "b.toml"])),
            Ok(Some("b.toml".into()))
        );
        assert_eq!(
            config_path(args(&["--config=c.toml"])),
            Ok(Some("c.toml".into()))
        );
        assert!(config_path(args(&["--config"])).is_err());
        assert!(config_path(args(&["serve"])).is_err());
    }
}
