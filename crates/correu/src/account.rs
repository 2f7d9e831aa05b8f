//! `correu account` and `correu alias`: edit `storage.accounts_file` and
//! `storage.aliases_file` safely. The new text is written to a file beside
//! the old one, synced, and renamed over it, so a storage replica reading
//! the file sees the old or the new one, never half; the new file keeps
//! the old one's owner, group, mode and POSIX ACL, so a Dovecot reading it
//! as group `dovecot` still can. Lines this command does not touch
//! (comments, other accounts, Dovecot's extra fields) are kept as they
//! were.

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

/// The extended attribute holding a file's POSIX ACL (`setfacl -m`).
const ACL_XATTR: &str = "system.posix_acl_access";

/// The ACL of the file at `path`, if it has one (`None` also where the
/// filesystem has no ACLs).
fn read_acl(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use rustix::io::Errno;
    loop {
        let len = match rustix::fs::getxattr_query(path, ACL_XATTR) {
            Ok(n) => n,
            Err(Errno::NODATA | Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut value = vec![0u8; len];
        match rustix::fs::getxattr(path, ACL_XATTR, &mut value[..]) {
            Ok(n) => {
                value.truncate(n);
                return Ok(Some(value));
            }
            // Changed between the two calls: ask again.
            Err(Errno::RANGE) => continue,
            Err(Errno::NODATA | Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Gives the new file `f` what the old one had: owner, group, mode and
/// ACL. Dovecot's auth reads the accounts file as group `dovecot` (mode
/// `0640`), so a file that came back as root's alone would lock every
/// IMAP login out.
fn keep_access(
    f: &std::fs::File,
    path: &Path,
    old: &std::fs::Metadata,
    acl: Option<&[u8]>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let new = f.metadata()?;
    if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
        std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid())).with_context(|| {
            format!(
                "cannot give the new {} the owner and group of the old one ({}:{}); \
                 run this as root or as the file's owner",
                path.display(),
                old.uid(),
                old.gid()
            )
        })?;
    }
    // After the owner: chown may clear set-id bits.
    f.set_permissions(old.permissions())?;
    match acl {
        Some(value) => rustix::fs::fsetxattr(f, ACL_XATTR, value, rustix::fs::XattrFlags::empty())
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot copy the ACL of {}", path.display()))?,
        // No ACL on the old file: none on the new one either, not even
        // one inherited from the directory's default ACL.
        None => match rustix::fs::fremovexattr(f, ACL_XATTR) {
            Ok(()) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        },
    }
    Ok(())
}

/// Makes the new file's modification time fall in a later second than
/// the old one's. Dovecot's passwd-file rereads the file when its mtime,
/// in whole seconds, or its size changed: a `passwd` (same size) in the
/// same second as the edit before it would otherwise go unnoticed, and
/// the old password would stay in force. Waits under a second, and only
/// for edits that close together.
fn later_second(f: &std::fs::File, old: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    if f.metadata()?.mtime() != old.mtime() {
        return Ok(());
    }
    // The same second: wait for the next one and stamp the file with it.
    let into = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::thread::sleep(Duration::from_nanos(u64::from(1_000_000_000 - into)));
    f.set_modified(SystemTime::now())
}

/// Replaces `path` with `text`: write beside it, sync, rename, sync the
/// directory. The file keeps its owner, group, mode and POSIX ACL (a
/// passwd file is private, and Dovecot may read it as its group); a new
/// file is `0600`.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let old = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let acl = match old {
        Some(_) => {
            read_acl(path).with_context(|| format!("cannot read the ACL of {}", path.display()))?
        }
        None => None,
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        match &old {
            Some(meta) => keep_access(&f, path, meta, acl.as_deref())?,
            None => {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
        }
        f.write_all(text.as_bytes())?;
        if let Some(meta) = &old {
            later_second(&f, meta)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
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

/// Refuses a target that mail could not reach: an address of a local
/// domain with no mailbox, alias or catch-all. Targets in other domains
/// are forwarded; returns how many there are.
fn servable_targets(
    cfg: &Config,
    aliases_text: &str,
    alias: &str,
    targets: &[String],
) -> anyhow::Result<usize> {
    let local = |a: &str| {
        a.rsplit_once('@')
            .is_some_and(|(_, d)| cfg.domains.iter().any(|x| x.eq_ignore_ascii_case(d)))
    };
    let accounts = match &cfg.storage.accounts_file {
        Some(p) => Some(parse_accounts(&read(p)?).0),
        None => None,
    };
    let open = accounts.is_none() && cfg.storage.mailboxes.is_empty();
    let aliases = parse_aliases(aliases_text).0;
    let mut forwards = 0;
    for t in targets {
        let t = t.trim().to_lowercase();
        if !local(&t) {
            forwards += 1;
            continue;
        }
        let domain = t.rsplit_once('@').map_or("", |(_, d)| d);
        let has_box = open
            || cfg
                .storage
                .mailboxes
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&t))
            || accounts.as_ref().is_some_and(|a| a.contains_key(&t));
        let leads_on = t != alias
            && (aliases.aliases.contains_key(&t) || aliases.catch_all.contains_key(domain));
        if !has_box && !leads_on {
            bail!(
                "{t} has no mailbox, alias or catch-all here, so mail to it would go nowhere; \
                 add the account first (correu account add {t})"
            );
        }
    }
    Ok(forwards)
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
            let forwards = servable_targets(&cfg, &text, &alias, &targets)?;
            if forwards > 0 && cfg.storage.srs_secret_file.is_none() {
                eprintln!(
                    "note: mail to {alias} is forwarded to other domains with its sender as it is; \
                     set storage.srs_secret_file so SPF passes at the next hop (SRS)"
                );
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

    /// A POSIX ACL in its extended-attribute form: version 2, then (tag,
    /// permissions, id) entries in tag order.
    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        v
    }

    #[test]
    fn replace_keeps_owner_group_mode_and_acl() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts");
        replace(&p, "one\n").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        // As root (CI), the file is someone else's; otherwise ours.
        if std::fs::metadata(&p).unwrap().uid() == 0 {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        // user::rw- user:65533:r-- group::r-- mask::r-- other::---
        const UNDEFINED: u32 = u32::MAX;
        let access = acl(&[
            (0x01, 6, UNDEFINED),
            (0x02, 4, 65533),
            (0x04, 4, UNDEFINED),
            (0x10, 4, UNDEFINED),
            (0x20, 0, UNDEFINED),
        ]);
        let with_acl =
            match rustix::fs::setxattr(&p, ACL_XATTR, &access, rustix::fs::XattrFlags::empty()) {
                Ok(()) => true,
                // A filesystem without ACLs: owner, group and mode still count.
                Err(rustix::io::Errno::NOTSUP) => false,
                Err(e) => panic!("setxattr: {e}"),
            };
        let before = std::fs::metadata(&p).unwrap();
        replace(&p, "two\n").unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_ne!(before.ino(), after.ino(), "a new file took its place");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        assert_eq!(
            (after.uid(), after.gid(), after.mode() & 0o7777),
            (before.uid(), before.gid(), before.mode() & 0o7777)
        );
        assert_eq!(after.mode() & 0o7777, 0o640);
        if with_acl {
            assert_eq!(read_acl(&p).unwrap(), Some(access));
        } else {
            assert_eq!(read_acl(&p).unwrap(), None);
        }
    }
}
