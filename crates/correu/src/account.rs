//! `correu account` and `correu alias`: edit `storage.accounts_file` and
//! `storage.aliases_file` safely. The new text is written to a file beside
//! the old one, synced, and renamed over it, so a storage replica reading
//! the file sees the old or the new one, never half. Lines this command
//! does not touch (comments, other accounts, Dovecot's extra fields) are
//! kept as they were.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use correu_runtime::Config;
use correu_storage::accounts::{hash_password, parse_accounts, parse_aliases, parse_size};

#[derive(Subcommand)]
pub enum AccountAction {
    /// Add an account; its password is read from standard input.
    Add {
        address: String,
        /// Quota such as 1G or 500M (the default: storage.default_quota).
        #[arg(long)]
        quota: Option<String>,
        /// An account that receives mail but cannot log in.
        #[arg(long)]
        no_password: bool,
    },
    /// Set an account's password, read from standard input.
    Passwd { address: String },
    /// Remove an account (its mailbox stays on disk).
    Del { address: String },
    /// List the accounts.
    List,
}

#[derive(Subcommand)]
pub enum AliasAction {
    /// Make ALIAS lead to TARGETs (`@domain` for a catch-all).
    Add {
        alias: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Remove an alias.
    Del { alias: String },
    /// List the aliases.
    List,
}

fn file(cfg: &Config, which: &str) -> anyhow::Result<PathBuf> {
    let path = match which {
        "accounts" => cfg.storage.accounts_file.clone(),
        _ => cfg.storage.aliases_file.clone(),
    };
    path.ok_or_else(|| anyhow!("storage.{which}_file is not set in the configuration"))
}

fn read(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Replaces `path` with `text`: write beside it, sync, rename, sync the
/// directory. The file's permissions are kept (a passwd file is private).
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _cleanup = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// The key of a line (its first `:`-field, lower-cased), if it is not a
/// comment or blank.
fn key_of(line: &str) -> Option<String> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    Some(t.split(':').next().unwrap_or("").trim().to_lowercase())
}

/// The text with the line for `key` replaced by `new` (or removed when
/// `new` is `None`); false when there was no such line.
fn edit(text: &str, key: &str, new: Option<&str>) -> (String, bool) {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.lines() {
        if !found && key_of(line).as_deref() == Some(key) {
            found = true;
            if let Some(n) = new {
                out.push_str(n);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, found)
}

fn append(text: &str, line: &str) -> String {
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

fn read_password() -> anyhow::Result<String> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("cannot read the password from standard input")?;
    let password = password.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("an empty password (use --no-password for an account without a login)");
    }
    Ok(password)
}

fn check_local(cfg: &Config, address: &str) -> anyhow::Result<String> {
    let address = address.to_lowercase();
    match address.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !address.contains([':', ' ', ','])
                && cfg.domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) =>
        {
            Ok(address)
        }
        _ => bail!(
            "{address} is not an address in one of this server's domains ({})",
            cfg.domains.join(", ")
        ),
    }
}

pub async fn account(cfg: Config, action: AccountAction) -> anyhow::Result<()> {
    let path = file(&cfg, "accounts")?;
    let text = read(&path)?;
    match action {
        AccountAction::Add {
            address,
            quota,
            no_password,
        } => {
            let address = check_local(&cfg, &address)?;
            if parse_accounts(&text).0.contains_key(&address) {
                bail!("{address} already has an account");
            }
            let hash = if no_password {
                String::new()
            } else {
                let h = hash_password(&read_password()?).map_err(|e| anyhow!("{e}"))?;
                format!("{{ARGON2ID}}{h}")
            };
            let mut line = format!("{address}:{hash}");
            if let Some(q) = quota {
                parse_size(&q).ok_or_else(|| anyhow!("--quota: {q:?} is not a size like 1G"))?;
                line.push_str(&format!("::::::userdb_quota_rule=*:storage={q}"));
            }
            replace(&path, &append(&text, &line))?;
            println!("{address}: added");
        }
        AccountAction::Passwd { address } => {
            let address = address.to_lowercase();
            let Some(old) = text
                .lines()
                .find(|l| key_of(l).as_deref() == Some(address.as_str()))
            else {
                bail!("{address} has no account");
            };
            let h = hash_password(&read_password()?).map_err(|e| anyhow!("{e}"))?;
            let mut fields: Vec<String> = old.trim().splitn(8, ':').map(String::from).collect();
            if fields.len() < 2 {
                fields.push(String::new());
            }
            fields[1] = format!("{{ARGON2ID}}{h}");
            let (new, _) = edit(&text, &address, Some(&fields.join(":")));
            replace(&path, &new)?;
            println!("{address}: password changed");
        }
        AccountAction::Del { address } => {
            let address = address.to_lowercase();
            let (new, found) = edit(&text, &address, None);
            if !found {
                bail!("{address} has no account");
            }
            replace(&path, &new)?;
            println!("{address}: removed (its mailbox is left on disk)");
        }
        AccountAction::List => {
            let (accounts, errors) = parse_accounts(&text);
            for e in errors {
                eprintln!("{}: {e}", path.display());
            }
            let mut all: Vec<_> = accounts.into_values().collect();
            all.sort_by(|a, b| a.address.cmp(&b.address));
            for a in all {
                let quota = match a.quota.unwrap_or(cfg.storage.default_quota.0) {
                    0 => "no quota".to_string(),
                    q => format!("quota {q} bytes"),
                };
                let login = if a.hash.is_some() { "" } else { "  (no login)" };
                println!("{}  {quota}{login}", a.address);
            }
        }
    }
    Ok(())
}

pub async fn alias(cfg: Config, action: AliasAction) -> anyhow::Result<()> {
    let path = file(&cfg, "aliases")?;
    let text = read(&path)?;
    match action {
        AliasAction::Add { alias, targets } => {
            let alias = alias.to_lowercase();
            if let Some(domain) = alias.strip_prefix('@') {
                check_local(&cfg, &format!("catch-all@{domain}"))?;
            } else {
                check_local(&cfg, &alias)?;
            }
            let line = format!("{alias}: {}", targets.join(", ").to_lowercase());
            if let Some(e) = parse_aliases(&line).1.first() {
                bail!("{}", e.trim_start_matches("line 1: "));
            }
            let (new, found) = edit(&text, &alias, Some(&line));
            let new = if found { new } else { append(&text, &line) };
            replace(&path, &new)?;
            println!("{line}");
        }
        AliasAction::Del { alias } => {
            let alias = alias.to_lowercase();
            let (new, found) = edit(&text, &alias, None);
            if !found {
                bail!("{alias} is not an alias");
            }
            replace(&path, &new)?;
            println!("{alias}: removed");
        }
        AliasAction::List => {
            let (aliases, errors) = parse_aliases(&text);
            for e in errors {
                eprintln!("{}: {e}", path.display());
            }
            let mut lines: Vec<String> = aliases
                .aliases
                .iter()
                .map(|(a, t)| format!("{a}: {}", t.join(", ")))
                .chain(
                    aliases
                        .catch_all
                        .iter()
                        .map(|(d, t)| format!("@{d}: {}", t.join(", "))),
                )
                .collect();
            lines.sort();
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_other_lines() {
        let text = "# accounts\npere@x.org:h1::::::quota=1G\nana@x.org:h2\n";
        let (new, found) = edit(text, "pere@x.org", Some("pere@x.org:h3::::::quota=1G"));
        assert!(found);
        assert_eq!(
            new,
            "# accounts\npere@x.org:h3::::::quota=1G\nana@x.org:h2\n"
        );
        let (new, found) = edit(text, "ANA@x.org".to_lowercase().as_str(), None);
        assert!(found);
        assert_eq!(new, "# accounts\npere@x.org:h1::::::quota=1G\n");
        assert!(!edit(text, "nobody@x.org", None).1);
        assert_eq!(append("a", "b"), "a\nb\n");
    }

    #[test]
    fn replace_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts");
        replace(&p, "one\n").unwrap();
        replace(&p, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        // Only the file itself: the temporary name is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
