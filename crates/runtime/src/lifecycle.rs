//! One lifecycle for every service: a [`CancellationToken`] cancelled on
//! SIGTERM (Kubernetes) or Ctrl-C. Services stop accepting work when it is
//! cancelled and wait for what they track under a deadline.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled when the process gets SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => log_signal_error(r),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            log_signal_error(tokio::signal::ctrl_c().await);
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    log_signal_error(tokio::signal::ctrl_c().await);
}

fn log_signal_error(r: std::io::Result<()>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "signal handler failed");
    }
}
