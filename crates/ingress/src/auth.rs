//! Checking SMTP AUTH credentials, behind one trait so the storage
//! service's account store can take over from the password file.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Argon2, PasswordHasher};
use correu_smtp::session::CredentialVerdict;

/// Checks a user name and password.
pub trait Authenticator: Send + Sync {
    fn check<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
    ) -> Pin<Box<dyn Future<Output = CredentialVerdict> + Send + 'a>>;
}

/// Accounts from a file of `address:HASH` lines (Dovecot passwd-file
/// style: extra `:`-fields are ignored, `{ARGON2ID}` scheme prefixes are
/// allowed, `#` starts a comment). Reloaded when the file changes; a bad
/// line is logged with its number and skipped.
pub struct PasswordFile {
    path: PathBuf,
    /// The file's modification time when read, and its accounts.
    state: RwLock<(Option<SystemTime>, Accounts)>,
}

/// Lower-cased address to argon2 hash.
type Accounts = Arc<HashMap<String, String>>;

/// Parses the file's text; returns the accounts and the bad lines' errors.
pub fn parse(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut accounts = HashMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(user), Some(hash)) = (fields.next(), fields.next()) else {
            errors.push(format!("line {}: expected address:hash", i + 1));
            continue;
        };
        let hash = hash
            .strip_prefix("{ARGON2ID}")
            .or_else(|| hash.strip_prefix("{ARGON2I}"))
            .unwrap_or(hash);
        if user.is_empty() || PasswordHash::new(hash).is_err() {
            errors.push(format!("line {}: not an argon2 hash for {user:?}", i + 1));
            continue;
        }
        accounts.insert(user.to_lowercase(), hash.to_string());
    }
    (accounts, errors)
}

/// An argon2id hash of `password` in PHC form, for the password file.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let bytes: [u8; 16] = rand::random();
    let salt = argon2::password_hash::SaltString::encode_b64(&bytes)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

impl PasswordFile {
    /// Reads the file now; an unreadable file stops the start.
    pub fn open(path: &Path) -> std::io::Result<PasswordFile> {
        let f = PasswordFile {
            path: path.into(),
            state: RwLock::new((None, Arc::new(HashMap::new()))),
        };
        f.refresh()?;
        Ok(f)
    }

    /// Rereads the file if it changed since the last read.
    fn refresh(&self) -> std::io::Result<Accounts> {
        let mtime = std::fs::metadata(&self.path)?.modified().ok();
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            if state.0.is_some() && state.0 == mtime {
                return Ok(state.1.clone());
            }
        }
        let text = std::fs::read_to_string(&self.path)?;
        let (accounts, errors) = parse(&text);
        for e in &errors {
            tracing::warn!(file = %self.path.display(), "{e}");
        }
        tracing::info!(file = %self.path.display(), accounts = accounts.len(), "accounts loaded");
        let accounts = Arc::new(accounts);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = (mtime, accounts.clone());
        Ok(accounts)
    }

    fn verify(&self, user: &str, password: &str) -> CredentialVerdict {
        let accounts = match self.refresh() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot read accounts");
                return CredentialVerdict::TryLater;
            }
        };
        let Some(hash) = accounts.get(&user.to_lowercase()) else {
            return CredentialVerdict::Invalid;
        };
        match PasswordHash::new(hash) {
            Ok(parsed)
                if Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok() =>
            {
                CredentialVerdict::Valid
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_hashes_and_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let hash = hash_password("secret").unwrap();
        std::fs::write(&path, format!("# accounts\njo@domini.com:{{ARGON2ID}}{hash}::::\nbroken line\nanna@x.org:plaintext\n")).unwrap();
        let (accounts, errors) = parse(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(accounts.len(), 1);
        assert_eq!(
            errors,
            vec![
                "line 3: expected address:hash",
                "line 4: not an argon2 hash for \"anna@x.org\""
            ]
        );
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
        std::thread::sleep(std::time::Duration::from_millis(20));
        let anna = hash_password("pw").unwrap();
        std::fs::write(&path, format!("anna@x.org:{anna}\n")).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(f.check("anna@x.org", "pw").await, CredentialVerdict::Valid);
        assert_eq!(
            f.check("jo@domini.com", "secret").await,
            CredentialVerdict::Invalid
        );
    }
}
