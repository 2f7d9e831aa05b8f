//! Checking SMTP AUTH credentials, behind one trait so the storage
//! service's account store can take over from the password file.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use correu_smtp::session::CredentialVerdict;
pub use correu_storage_client::accounts::hash_password;
use correu_storage_client::accounts::{Account, Watched, check_password, parse_accounts};

/// Failed logins, counted per client address and per account in windows
/// shared by every replica (Redis): each failure from an address is
/// answered later than the one before, an address past its limit is
/// turned away until the window ends, and an account under attack is
/// slowed down (never locked: its own password still works).
pub struct Throttle {
    /// The delay after a first failure; it doubles with each failure from
    /// the same address, up to 30 times itself.
    pub base: std::time::Duration,
    pub per_client: correu_runtime::config::Rate,
    pub per_account: correu_runtime::config::Rate,
}

/// What the throttle says before a password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Check it, after waiting this long (zero: at once).
    Check(std::time::Duration),
    /// The address has failed too often: turn it away.
    TooMany,
}

impl Throttle {
    /// The longest wait.
    pub fn cap(&self) -> std::time::Duration {
        self.base * 30
    }

    /// The wait after the `n`-th failure from an address (1, 2, 4 … ×
    /// `base`, up to [`Throttle::cap`]).
    pub fn delay_after(&self, n: u64) -> std::time::Duration {
        if n == 0 {
            return std::time::Duration::ZERO;
        }
        let factor = 1u32 << (n - 1).min(5) as u32;
        (self.base * factor).min(self.cap())
    }

    /// Before checking `user`'s password for `ip`.
    pub async fn before(
        &self,
        limits: &correu_runtime::limits::RateLimiter,
        ip: &str,
        user: &str,
    ) -> Before {
        if !self.per_client.is_unlimited()
            && limits
                .tally("auth-fail-ip", ip, self.per_client.per, 0)
                .await
                >= self.per_client.count
        {
            return Before::TooMany;
        }
        let account = user.to_lowercase();
        if !self.per_account.is_unlimited()
            && limits
                .tally("auth-fail-user", &account, self.per_account.per, 0)
                .await
                >= self.per_account.count
        {
            return Before::Check(self.cap());
        }
        Before::Check(std::time::Duration::ZERO)
    }

    /// After a failed check: counts it, and how long to wait before
    /// answering.
    pub async fn failed(
        &self,
        limits: &correu_runtime::limits::RateLimiter,
        ip: &str,
        user: &str,
    ) -> std::time::Duration {
        let n = limits
            .tally(
                "auth-fail-ip",
                ip,
                self.per_client.per.max(std::time::Duration::from_secs(1)),
                1,
            )
            .await;
        let account = user.to_lowercase();
        limits
            .tally(
                "auth-fail-user",
                &account,
                self.per_account.per.max(std::time::Duration::from_secs(1)),
                1,
            )
            .await;
        self.delay_after(n)
    }
}

/// Checks a user name and password.
pub trait Authenticator: Send + Sync {
    fn check<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = CredentialVerdict> + Send + 'a>>;
}

/// Accounts from a file in Dovecot's passwd-file format (the format of
/// `storage.accounts_file`; see `correu_storage_client::accounts`), reread when
/// it changes; a bad line is logged with its number and skipped.
pub struct PasswordFile {
    accounts: Watched<HashMap<String, Account>>,
}

impl PasswordFile {
    /// Reads the file now; an unreadable file stops the start.
    pub fn open(path: &Path) -> std::io::Result<PasswordFile> {
        Ok(PasswordFile {
            accounts: Watched::open(path, "accounts", parse_accounts)?,
        })
    }

    /// The password hash of `user`, if it has one.
    fn hash_of(&self, user: &str) -> Option<String> {
        self.accounts
            .get()
            .get(&user.to_lowercase())
            .and_then(|a| a.hash.clone())
    }
}

impl Authenticator for Arc<PasswordFile> {
    fn check<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = CredentialVerdict> + Send + 'a>> {
        let hash = self.hash_of(user);
        let password = password.to_string();
        Box::pin(async move {
            // Argon2, a few at a time, off the async threads; a user with no
            // hash is checked against a dummy one, so the time says nothing.
            if check_password(hash, password).await {
                CredentialVerdict::Valid
            } else {
                CredentialVerdict::Invalid
            }
        })
    }
}

/// Storage's accounts, through its `Authenticate` call (the default when
/// `smtp.auth_file` is not set).
pub struct StorageAccounts {
    pub client: correu_storage_client::Client,
}

impl Authenticator for StorageAccounts {
    fn check<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = CredentialVerdict> + Send + 'a>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let req = correu_proto::v1::AuthenticateRequest {
                address: user.to_string(),
                password: password.to_string(),
            };
            match client.authenticate(req).await {
                Ok(r) if r.get_ref().ok => CredentialVerdict::Valid,
                Ok(_) => CredentialVerdict::Invalid,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "storage could not check a password");
                    CredentialVerdict::TryLater
                }
            }
        })
    }
}

#[cfg(test)]
// Test set-up writes its files before anything reads them.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn failures_double_the_wait_up_to_its_cap() {
        let t = Throttle {
            base: std::time::Duration::from_secs(1),
            per_client: correu_runtime::config::Rate::per(10, 900),
            per_account: correu_runtime::config::Rate::per(20, 900),
        };
        let waits: Vec<u64> = (0..9).map(|n| t.delay_after(n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[tokio::test]
    async fn an_address_is_turned_away_and_an_account_slowed_down() {
        let limits = correu_runtime::limits::RateLimiter::new(&Default::default()).unwrap();
        let t = Throttle {
            base: std::time::Duration::from_millis(10),
            per_client: correu_runtime::config::Rate::per(3, 900),
            per_account: correu_runtime::config::Rate::per(5, 900),
        };
        for _ in 0..3 {
            assert_eq!(
                t.before(&limits, "192.0.2.1", "jo@x.org").await,
                Before::Check(std::time::Duration::ZERO)
            );
            t.failed(&limits, "192.0.2.1", "jo@x.org").await;
        }
        assert_eq!(
            t.before(&limits, "192.0.2.1", "jo@x.org").await,
            Before::TooMany
        );
        // Another address: still served; once the account has had its
        // failures, every attempt on it waits the longest.
        for _ in 0..2 {
            assert_eq!(
                t.before(&limits, "192.0.2.2", "JO@x.org").await,
                Before::Check(std::time::Duration::ZERO)
            );
            t.failed(&limits, "192.0.2.2", "JO@x.org").await;
        }
        assert_eq!(
            t.before(&limits, "192.0.2.3", "jo@x.org").await,
            Before::Check(t.cap())
        );
        assert_eq!(
            t.before(&limits, "192.0.2.3", "ana@x.org").await,
            Before::Check(std::time::Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn checks_hashes_and_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let hash = hash_password("secret").unwrap();
        std::fs::write(&path, format!("# accounts\njo@domini.com:{{ARGON2ID}}{hash}::::\nbroken line\nanna@x.org:plaintext\n")).unwrap();
        let f = Arc::new(PasswordFile::open(&path).unwrap());
        assert_eq!(
            f.check("JO@domini.com", "secret").await,
            CredentialVerdict::Valid
        );
        assert_eq!(
            f.check("jo@domini.com", "wrong").await,
            CredentialVerdict::Invalid
        );
        assert_eq!(
            f.check("nobody@x.org", "secret").await,
            CredentialVerdict::Invalid
        );
        // A new account appears when the file changes.
        let anna = hash_password("pw").unwrap();
        std::fs::write(&path, format!("anna@x.org:{anna}\n")).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        f.accounts.reload_if_changed();
        assert_eq!(f.check("anna@x.org", "pw").await, CredentialVerdict::Valid);
        assert_eq!(
            f.check("jo@domini.com", "secret").await,
            CredentialVerdict::Invalid
        );
    }
}
