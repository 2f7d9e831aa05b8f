//! Who has a mailbox: accounts, aliases and catch-alls (the files are
//! read and watched by `correu_storage_client::accounts`, re-exported
//! here), and how an address resolves to mailboxes.

use std::collections::HashMap;

pub use correu_storage_client::accounts::*;

/// Where mail for an address goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// These mailboxes (lower-cased addresses), and these addresses of
    /// other domains the mail is forwarded to; at least one of the two.
    Targets {
        mailboxes: Vec<String>,
        forward: Vec<String>,
    },
    Unknown,
}

impl Resolved {
    /// The local mailboxes (none for an address that only forwards).
    pub fn mailboxes(&self) -> &[String] {
        match self {
            Resolved::Targets { mailboxes, .. } => mailboxes,
            Resolved::Unknown => &[],
        }
    }
}

/// Accounts, aliases and catch-alls together.
pub struct Directory {
    domains: Vec<String>,
    accounts: Option<Watched<HashMap<String, Account>>>,
    aliases: Option<Watched<Aliases>>,
    /// Addresses from `storage.mailboxes` (no password, default quota).
    listed: Vec<String>,
    default_quota: u64,
}

/// Aliases lead to aliases at most this deep (a loop ends here too).
const MAX_ALIAS_DEPTH: usize = 8;

impl Directory {
    pub fn new(
        domains: &[String],
        accounts: Option<Watched<HashMap<String, Account>>>,
        aliases: Option<Watched<Aliases>>,
        listed: &[String],
        default_quota: u64,
    ) -> Directory {
        Directory {
            domains: domains.iter().map(|d| d.to_lowercase()).collect(),
            accounts,
            aliases,
            listed: listed.iter().map(|a| a.to_lowercase()).collect(),
            default_quota,
        }
    }

    /// Every local-part of every local domain has a mailbox: no accounts
    /// file and no `storage.mailboxes` (the embedded default).
    fn open_mode(&self) -> bool {
        self.accounts.is_none() && self.listed.is_empty()
    }

    fn is_local(&self, address: &str) -> bool {
        address
            .rsplit_once('@')
            .is_some_and(|(_, d)| self.domains.iter().any(|x| x == d))
    }

    /// Whether `address` (lower-cased) has a mailbox of its own.
    pub fn is_mailbox(&self, address: &str) -> bool {
        let accounts = self.accounts.as_ref().map(Watched::get);
        self.has_mailbox(address, accounts.as_deref())
    }

    fn has_mailbox(&self, address: &str, accounts: Option<&HashMap<String, Account>>) -> bool {
        self.is_local(address)
            && (self.open_mode()
                || self.listed.iter().any(|a| a == address)
                || accounts.is_some_and(|a| a.contains_key(address)))
    }

    /// The mailboxes `address` leads to: an alias's targets (aliases of
    /// aliases followed), the address's own mailbox, or its domain's
    /// catch-all; and the addresses of other domains it forwards to.
    /// A local target without a mailbox leads nowhere (`correu alias add`
    /// refuses one; a mailbox deleted later is logged here).
    pub fn resolve(&self, address: &str) -> Resolved {
        let address = address.to_lowercase();
        let accounts = self.accounts.as_ref().map(Watched::get);
        let aliases = self.aliases.as_ref().map(Watched::get);
        let mut out: Vec<String> = Vec::new();
        let mut forward: Vec<String> = Vec::new();
        let mut todo = vec![(address.clone(), 0usize)];
        while let Some((a, depth)) = todo.pop() {
            let expansion = aliases.as_ref().and_then(|al| al.aliases.get(&a));
            match expansion {
                Some(targets) if depth < MAX_ALIAS_DEPTH => {
                    for t in targets.iter().rev() {
                        // An alias may name itself to keep a copy.
                        if *t == a {
                            if self.has_mailbox(t, accounts.as_deref()) && !out.contains(t) {
                                out.push(t.clone());
                            }
                        } else {
                            todo.push((t.clone(), depth + 1));
                        }
                    }
                }
                Some(_) => {
                    tracing::warn!(alias = %address, "aliases nest too deep (a loop?); stopping");
                }
                None if self.has_mailbox(&a, accounts.as_deref()) => {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
                None if depth == 0 => {
                    let domain = a.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
                    if let Some(targets) = aliases.as_ref().and_then(|al| al.catch_all.get(domain))
                        && self.is_local(&a)
                    {
                        for t in targets {
                            todo.push((t.clone(), depth + 1));
                        }
                    }
                }
                None if !self.is_local(&a) => {
                    if !forward.contains(&a) {
                        forward.push(a);
                    }
                }
                None => {
                    tracing::warn!(alias = %address, target = %a, "alias target has no mailbox here; skipped");
                }
            }
        }
        if out.is_empty() && forward.is_empty() {
            Resolved::Unknown
        } else {
            Resolved::Targets {
                mailboxes: out,
                forward,
            }
        }
    }

    /// The accounts as last read (`None` without an accounts file); a new
    /// `Arc` after each change of the file.
    pub fn accounts(&self) -> Option<std::sync::Arc<HashMap<String, Account>>> {
        self.accounts.as_ref().map(Watched::get)
    }

    /// How many mailboxes the directory names (accounts and listed
    /// addresses); `None` in open mode, where any local-part has one.
    pub fn mailbox_count(&self) -> Option<usize> {
        if self.open_mode() {
            return None;
        }
        let accounts = self.accounts().map_or(0, |a| a.len());
        Some(accounts + self.listed.len())
    }

    /// The quota an account gets: its own, or the default.
    pub fn quota_of(&self, account: &Account) -> u64 {
        account.quota.unwrap_or(self.default_quota)
    }

    /// The quota of a mailbox in bytes; 0 for none.
    pub fn quota(&self, mailbox: &str) -> u64 {
        self.accounts
            .as_ref()
            .and_then(|w| w.get().get(mailbox).and_then(|a| a.quota))
            .unwrap_or(self.default_quota)
    }

    /// The account `address` logs in as, when `password` is its password.
    /// Blocking (argon2): call it from `spawn_blocking`.
    pub fn authenticate(&self, address: &str, password: &str) -> Option<String> {
        let (account, hash) = self.credentials(address)?;
        verify_password(&hash?, password).then_some(account)
    }

    /// The account `address` names, with its password hash (`None`: it
    /// cannot log in); `None` when there is no such account.
    pub fn credentials(&self, address: &str) -> Option<(String, Option<String>)> {
        let accounts = self.accounts.as_ref()?.get();
        let account = accounts.get(&address.to_lowercase())?;
        Some((account.address.clone(), account.hash.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn watched<T: Send + Sync + 'static>(
        dir: &Path,
        name: &str,
        text: &str,
        what: &'static str,
        parse: fn(&str) -> (T, Vec<String>),
    ) -> Watched<T> {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Watched::open(&path, what, parse).unwrap()
    }

    #[test]
    fn resolution_aliases_catch_all_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = watched(
            dir.path(),
            "accounts",
            "pere@example.org:\nana@example.org:\n",
            "accounts",
            parse_accounts,
        );
        let aliases = watched(
            dir.path(),
            "aliases",
            "team@example.org: pere@example.org, ana@example.org, ghost@example.org\n\
             all@example.org: team@example.org, pere@example.org\n\
             self@example.org: self@example.org\n\
             loop1@example.org: loop2@example.org\n\
             loop2@example.org: loop1@example.org\n\
             pere@example.org: pere@example.org, ana@example.org\n\
             fwd@example.org: ana@example.org, jo@remote.test, team@example.org\n\
             away@example.org: jo@remote.test, JO@remote.test\n\
             @example.org: ana@example.org\n",
            "aliases",
            parse_aliases,
        );
        let d = Directory::new(
            &["example.org".into()],
            Some(accounts),
            Some(aliases),
            &[],
            0,
        );
        let boxes = |a: &str| d.resolve(a).mailboxes().to_vec();
        assert_eq!(boxes("ANA@example.org"), ["ana@example.org"]);
        // An alias that names itself keeps a copy.
        assert_eq!(
            boxes("pere@example.org"),
            ["pere@example.org", "ana@example.org"]
        );
        assert_eq!(
            boxes("team@example.org"),
            ["pere@example.org", "ana@example.org"]
        );
        assert_eq!(
            boxes("all@example.org"),
            ["pere@example.org", "ana@example.org"]
        );
        // The catch-all takes what nothing else does.
        assert_eq!(boxes("whoever@example.org"), ["ana@example.org"]);
        assert_eq!(boxes("loop1@example.org"), Vec::<String>::new());
        assert_eq!(d.resolve("x@elsewhere.org"), Resolved::Unknown);
        // Other domains' addresses are forwarded to, once each.
        assert_eq!(
            d.resolve("fwd@example.org"),
            Resolved::Targets {
                mailboxes: vec!["ana@example.org".into(), "pere@example.org".into()],
                forward: vec!["jo@remote.test".into()],
            }
        );
        assert_eq!(
            d.resolve("away@example.org"),
            Resolved::Targets {
                mailboxes: vec![],
                forward: vec!["jo@remote.test".into()],
            }
        );
    }
}
