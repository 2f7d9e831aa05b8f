//! Checking SMTP AUTH credentials, behind one trait so the storage
//! service's account store can take over from the password file.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use correu_smtp::session::CredentialVerdict;
pub use correu_storage_client::accounts::hash_password;
use correu_storage_client::accounts::{Account, Watched, parse_accounts, verify_password};

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

    fn verify(&self, user: &str, password: &str) -> CredentialVerdict {
        let accounts = self.accounts.get();
        match accounts
            .get(&user.to_lowercase())
            .and_then(|a| a.hash.as_deref())
        {
            Some(hash) if verify_password(hash, password) => CredentialVerdict::Valid,
            _ => CredentialVerdict::Invalid,
        }
    }
}

impl Authenticator for Arc<PasswordFile> {
    fn check<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = CredentialVerdict> + Send + 'a>> {
        let me = self.clone();
        let (user, password) = (user.to_string(), password.to_string());
        Box::pin(async move {
            // argon2 is slow on purpose: off the async threads.
            tokio::task::spawn_blocking(move || me.verify(&user, &password))
                .await
                .unwrap_or(CredentialVerdict::TryLater)
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
