//! Correu's configuration: one TOML file, `CORREU_…` environment overrides,
//! checked in full before any port is bound.
//!
//! Every key has a default, so an empty file (or none) runs `correu serve`
//! on 127.0.0.1:2525 for the domain `localhost`. Errors name the key:
//! `smtp.listen[0]: invalid socket address syntax`.
//!
//! Environment overrides name a key with its section: `CORREU_HOSTNAME`,
//! `CORREU_SMTP_LISTEN`, `CORREU_QUEUE_URL`, `CORREU_DELIVERY_MX_PORT`. The
//! value is read as a TOML value when it is one (`25`, `true`,
//! `["a","b"]`), else as a string; lists also take `a,b`.
//!
//! # Layout
//! - this file: [`Config`], loading, and the [`Role`] a check is made for;
//! - one file per section ([`smtp`], [`inbound`], [`dns`], [`queue`],
//!   [`storage`], [`delivery`], [`redis`], [`telemetry`]), each with its
//!   defaults and its checks;
//! - [`values`]: durations, rates, sizes, networks;
//! - `env`: the `CORREU_…` overlay, and the Kubernetes service-link
//!   variables it sets aside.
//!
//! One file serves every role, so each role checks the keys it uses: a
//! storage pod does not look for the certificate only ingress mounts.
//! Unknown keys and values of the wrong type are errors for every role.

mod delivery;
mod dns;
mod env;
mod events;
mod inbound;
mod queue;
mod redis;
mod smtp;
mod storage;
mod telemetry;
mod values;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use delivery::{
    BOUNCE_CLASSES, ClientTimeouts, DeliveryConfig, DkimAlgorithm, DkimConfig, OutboundTls, Route,
    Shape, SuppressionConfig, TlsReportsConfig, name_matches,
};
pub use dns::DnsConfig;
pub use events::{EventsConfig, OUTCOMES, WebhookConfig};
pub use inbound::{
    Blocklist, BlocklistKind, DmarcAction, GreylistConfig, InboundConfig, InboundPolicy, Milter,
    MilterDefault, SpfFailAction,
};
pub use queue::{QueueBackend, QueueConfig};
pub use redis::RedisConfig;
pub use smtp::SmtpConfig;
pub use storage::StorageConfig;
pub use telemetry::TelemetryConfig;
pub use values::{Dur, Network, Rate, Size, split_host_port};

use values::{is_domain, one_or_many};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// This server's name: greeting, EHLO, Received, and HELO when relaying.
    pub hostname: String,
    /// Domains whose mail is stored here; every other domain is relayed.
    #[serde(deserialize_with = "one_or_many")]
    pub domains: Vec<String>,
    pub smtp: SmtpConfig,
    pub inbound: InboundConfig,
    pub dns: DnsConfig,
    pub queue: QueueConfig,
    pub storage: StorageConfig,
    pub delivery: DeliveryConfig,
    pub redis: RedisConfig,
    pub telemetry: TelemetryConfig,
    pub events: EventsConfig,
    pub webhook: WebhookConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: "localhost".into(),
            domains: vec!["localhost".into()],
            smtp: SmtpConfig::default(),
            inbound: InboundConfig::default(),
            dns: DnsConfig::default(),
            queue: QueueConfig::default(),
            storage: StorageConfig::default(),
            delivery: DeliveryConfig::default(),
            redis: RedisConfig::default(),
            telemetry: TelemetryConfig::default(),
            events: EventsConfig::default(),
            webhook: WebhookConfig::default(),
        }
    }
}

/// Keys that were renamed, and where they went: a file written for an
/// older Correu is told what to write instead.
const MOVED: &[(&str, &str)] = &[
    ("delivery.connect_timeout", "delivery.timeouts.connect"),
    (
        "delivery.command_timeout",
        "delivery.timeouts.banner, .ehlo, .mail, .rcpt and .data",
    ),
    ("delivery.data_timeout", "delivery.timeouts.data_end"),
    ("delivery.dns_server", "dns.server"),
];

/// Who the configuration is checked for. Each role checks the sections it
/// uses and the files it opens; every role refuses unknown keys and values
/// of the wrong type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `correu serve`, and `correu check-config` unless told otherwise:
    /// everything.
    Serve,
    Ingress,
    Delivery,
    Storage,
    /// `correu webhook`: delivery events posted to URLs.
    Webhook,
    /// The operator's commands (`correu queue`, `mailbox`, `account`):
    /// every value is checked, but no file is looked for, since a tool run
    /// in one pod must not need what only another pod mounts.
    Admin,
}

impl Role {
    pub(crate) fn runs_ingress(self) -> bool {
        matches!(self, Role::Serve | Role::Ingress | Role::Admin)
    }
    pub(crate) fn runs_delivery(self) -> bool {
        matches!(self, Role::Serve | Role::Delivery | Role::Admin)
    }
    pub(crate) fn runs_storage(self) -> bool {
        matches!(self, Role::Serve | Role::Storage | Role::Admin)
    }
    pub(crate) fn runs_webhook(self) -> bool {
        matches!(self, Role::Serve | Role::Webhook | Role::Admin)
    }
    pub(crate) fn uses_queue(self) -> bool {
        !matches!(self, Role::Storage)
    }
    pub(crate) fn uses_redis(self) -> bool {
        !matches!(self, Role::Storage)
    }
    pub(crate) fn calls_storage(self) -> bool {
        !matches!(self, Role::Storage | Role::Webhook)
    }
    fn opens_files(self) -> bool {
        !matches!(self, Role::Admin)
    }

    /// `telemetry.listen` when the configuration does not set it: one port
    /// per role, so one file serves all three on one host.
    pub fn default_telemetry_listen(self) -> std::net::SocketAddr {
        let port = match self {
            Role::Serve | Role::Ingress | Role::Admin => 9725,
            Role::Delivery => 9726,
            Role::Storage => 9727,
            Role::Webhook => 9728,
        };
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Ok(match s {
            "serve" => Role::Serve,
            "ingress" => Role::Ingress,
            "delivery" => Role::Delivery,
            "storage" => Role::Storage,
            "webhook" => Role::Webhook,
            "admin" => Role::Admin,
            other => {
                return Err(format!(
                    "`{other}`: a role is serve, ingress, delivery, storage, webhook or admin"
                ));
            }
        })
    }
}

/// The checks of one role, collecting every error.
pub(crate) struct Check {
    pub role: Role,
    errors: Vec<ConfigError>,
}

impl Check {
    pub fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(err(key, message));
    }

    /// A file this role opens must exist (it is opened for real later,
    /// with its own error; this names the key before any port is bound).
    pub fn readable_file(&mut self, key: impl Into<String>, path: &Path) {
        if self.role.opens_files() && !path.is_file() {
            self.err(key, format!("{} is not a readable file", path.display()));
        }
    }
}

/// One thing wrong with the configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, as a TOML path (`smtp.listen[0]`), or the file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "configuration has {} error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

pub(crate) fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Whether delivery publishes its events: `events.enabled`, or a
    /// webhook to post them to.
    pub fn publishes_events(&self) -> bool {
        self.events.enabled || !self.webhook.urls.is_empty()
    }

    /// Loads the file (if any), applies `CORREU_…` variables from `env`, and
    /// checks the result for `role`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        role: Role,
    ) -> Result<Config, ConfigErrors> {
        let mut root = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigErrors(vec![err(
                        path.display().to_string(),
                        format!("cannot read: {e}"),
                    )])
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigErrors(vec![err(
                        path.display().to_string(),
                        format!("not valid TOML: {}", e.to_string().trim()),
                    )])
                })?
            }
            None => toml::Table::new(),
        };
        let overlay = env::apply(&mut root, env);
        for name in &overlay.set_aside {
            tracing::debug!(variable = %name, "a Kubernetes service link, not a setting");
        }
        let errors = overlay.errors.clone();
        let config = Self::from_table(root, &overlay, role).map_err(|mut e| {
            e.0.splice(0..0, errors.clone());
            e
        })?;
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(config)
    }

    fn from_table(
        table: toml::Table,
        overlay: &env::Overlay,
        role: Role,
    ) -> Result<Config, ConfigErrors> {
        let name = |path: String| match overlay.sources.get(&path) {
            Some(var) => format!("{path} (from {var})"),
            None => path,
        };
        let telemetry_set = table
            .get("telemetry")
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key("listen"));
        let mut unknown = Vec::new();
        let value = toml::Value::Table(table);
        let mut track = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(value, &mut track);
        let parsed: Result<Config, _> = serde_path_to_error::deserialize(de);
        let mut errors: Vec<ConfigError> = Vec::new();
        for k in unknown {
            match overlay.link_shaped.get(&k) {
                Some(var) => {
                    tracing::debug!(variable = %var, "a Kubernetes service link, not a setting")
                }
                None => {
                    let why = match MOVED.iter().find(|(old, _)| *old == k) {
                        Some((_, new)) => format!("unknown key (it moved: {new})"),
                        None => "unknown key".to_string(),
                    };
                    errors.push(err(name(k), why))
                }
            }
        }
        match parsed {
            Ok(mut config) => {
                if !telemetry_set {
                    config.telemetry.listen = role.default_telemetry_listen();
                }
                errors.extend(config.validate(role));
                if errors.is_empty() {
                    Ok(config)
                } else {
                    Err(ConfigErrors(errors))
                }
            }
            Err(e) => {
                let path = e.path().to_string();
                errors.push(err(name(path), e.into_inner().to_string()));
                Err(ConfigErrors(errors))
            }
        }
    }

    /// The checks serde cannot make, for one role: every one that fails is
    /// reported.
    fn validate(&self, role: Role) -> Vec<ConfigError> {
        let mut c = Check {
            role,
            errors: Vec::new(),
        };
        if !is_domain(&self.hostname) {
            c.err(
                "hostname",
                format!("`{}` is not a host name", self.hostname),
            );
        }
        if self.domains.is_empty() {
            c.err("domains", "at least one local domain is needed");
        }
        for (i, d) in self.domains.iter().enumerate() {
            if !is_domain(d) {
                c.err(format!("domains[{i}]"), format!("`{d}` is not a domain"));
            }
        }
        self.smtp.validate(&mut c);
        self.inbound.validate(&self.hostname, &self.domains, &mut c);
        self.dns.validate(&mut c);
        self.queue.validate(&mut c);
        self.storage.validate(&self.domains, &mut c);
        self.redis.validate(&mut c);
        self.delivery.validate(&mut c);
        self.webhook.validate(&mut c);
        c.errors
    }

    /// Every key with its value, as TOML (`correu check-config --show`):
    /// loading it again gives the same configuration.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The queue backend: as configured, or the default for the caller.
    pub fn queue_backend(&self, default: QueueBackend) -> QueueBackend {
        self.queue.backend.unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        load_as(Role::Serve, text, env)
    }

    fn load_as(role: Role, text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("correu.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            role,
        )
    }

    /// What the kubelet gives every pod of a release named `correu`: the
    /// links of its Services `correu` (no component), `correu-ingress`,
    /// `correu-storage`, `correu-redis`, `correu-rabbitmq`, and of a
    /// Service whose link happens to be named like a key.
    const SERVICE_LINKS: &[(&str, &str)] = &[
        ("CORREU_SERVICE_HOST", "10.96.0.9"),
        ("CORREU_SERVICE_PORT", "25"),
        ("CORREU_SERVICE_PORT_SMTP", "25"),
        ("CORREU_PORT", "tcp://10.96.0.9:25"),
        ("CORREU_INGRESS_SERVICE_HOST", "10.96.0.10"),
        ("CORREU_INGRESS_SERVICE_PORT", "25"),
        ("CORREU_INGRESS_SERVICE_PORT_SMTP", "25"),
        ("CORREU_INGRESS_PORT", "tcp://10.96.0.10:25"),
        ("CORREU_INGRESS_PORT_25_TCP", "tcp://10.96.0.10:25"),
        ("CORREU_INGRESS_PORT_25_TCP_PROTO", "tcp"),
        ("CORREU_INGRESS_PORT_25_TCP_PORT", "25"),
        ("CORREU_INGRESS_PORT_25_TCP_ADDR", "10.96.0.10"),
        ("CORREU_STORAGE_SERVICE_HOST", "10.96.0.11"),
        ("CORREU_STORAGE_SERVICE_PORT_GRPC", "2526"),
        ("CORREU_STORAGE_PORT", "tcp://10.96.0.11:2526"),
        ("CORREU_STORAGE_PORT_2526_TCP_ADDR", "10.96.0.11"),
        ("CORREU_STORAGE_PORT_2526_TCP_PORT", "2526"),
        ("CORREU_STORAGE_PORT_2526_TCP_PROTO", "tcp"),
        ("CORREU_REDIS_SERVICE_HOST", "10.96.0.12"),
        ("CORREU_REDIS_PORT", "tcp://10.96.0.12:6379"),
        ("CORREU_REDIS_PORT_6379_TCP", "tcp://10.96.0.12:6379"),
        ("CORREU_RABBITMQ_SERVICE_PORT_AMQP", "5672"),
        ("CORREU_RABBITMQ_PORT_5672_TCP_ADDR", "10.96.0.13"),
        ("CORREU_DELIVERY_MX_PORT", "tcp://10.96.0.14:25"),
    ];

    #[test]
    fn kubernetes_service_links_are_not_settings() {
        let mut env = SERVICE_LINKS.to_vec();
        env.push(("CORREU_QUEUE_URL", "amqp://u:p@rabbitmq:5672/%2f"));
        env.push(("CORREU_REDIS_URL", "redis://redis:6379"));
        for role in [Role::Serve, Role::Ingress, Role::Delivery, Role::Storage] {
            let c = load_as(role, "", &env).unwrap_or_else(|e| panic!("{role:?}: {e}"));
            assert_eq!(c.queue.url, "amqp://u:p@rabbitmq:5672/%2f");
            assert_eq!(c.redis.url.as_deref(), Some("redis://redis:6379"));
            assert_eq!(c.delivery.mx_port, 25, "a link's value is not a port");
        }
        // A real key still takes a real value, and a misspelt one that is
        // not shaped like a link is still an error.
        let c = load("", &[("CORREU_DELIVERY_MX_PORT", "2500")]).unwrap();
        assert_eq!(c.delivery.mx_port, 2500);
        let e = load("", &[("CORREU_SMTP_LISTNE", "0.0.0.0:25")]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.listne (from CORREU_SMTP_LISTNE)"]);
    }

    #[test]
    fn each_role_checks_what_it_uses() {
        let text = "[smtp]\ntls_certificate = \"/etc/correu/tls/tls.crt\"\ntls_key = \"/etc/correu/tls/tls.key\"\n\
                    [queue]\nurl = \"\"\n\
                    [delivery.dkim.\"example.org\"]\nselector = \"s1\"\nkey_file = \"/etc/correu/dkim/example.org.pem\"\n";
        let errors = |role| match load_as(role, text, &[]) {
            Ok(_) => Vec::new(),
            Err(e) => keys(e),
        };
        assert_eq!(errors(Role::Storage), Vec::<String>::new());
        assert_eq!(
            errors(Role::Ingress),
            vec!["smtp.tls_certificate", "smtp.tls_key", "queue.url"]
        );
        assert_eq!(
            errors(Role::Delivery),
            vec!["queue.url", "delivery.dkim.example.org.key_file"]
        );
        assert_eq!(
            errors(Role::Serve),
            vec![
                "smtp.tls_certificate",
                "smtp.tls_key",
                "queue.url",
                "delivery.dkim.example.org.key_file"
            ]
        );
        assert_eq!(errors(Role::Admin), vec!["queue.url"]);
        // Unknown keys and wrong types are every role's business.
        let e = load_as(Role::Storage, "[delivery]\nconcurency = 3\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["delivery.concurency"]);
        let e = load_as(Role::Storage, "[smtp]\nmax_recipients = \"x\"\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.max_recipients"]);
    }

    fn keys(e: ConfigErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.domains, vec!["localhost"]);
        assert_eq!(c.smtp.max_recipients, 100);
        assert_eq!(c.queue.max_age, Dur::secs(432_000));
        assert!(c.storage.mailboxes.is_empty());
        assert_eq!(
            c.queue_backend(QueueBackend::Embedded),
            QueueBackend::Embedded
        );
    }

    #[test]
    fn shown_configuration_loads_back_the_same() {
        let text = "hostname = \"mx.example.org\"\ndomains = [\"example.org\"]\n[smtp]\nmessage_rate = \"5/1h\"\ntrusted_networks = [\"10.0.0.0/8\"]\n[delivery.routes]\n\"*\" = { host = \"relay\", port = 587, tls = \"required\" }\n";
        for c in [Config::default(), load(text, &[]).unwrap()] {
            let shown = c.to_toml().unwrap();
            let again = load(&shown, &[]).unwrap_or_else(|e| panic!("{e}\n{shown}"));
            assert_eq!(again.to_toml().unwrap(), shown);
        }
    }

    #[test]
    fn file_values_and_env_overrides() {
        let c = load(
            "hostname = \"mx.example.org\"\ndomains = [\"example.org\"]\n[smtp]\nmax_recipients = 5\ncommand_timeout = \"2m\"\n[delivery.routes]\n\"*\" = \"smarthost:587\"\n",
            &[
                ("CORREU_SMTP_LISTEN", "0.0.0.0:25,[::]:25"),
                ("CORREU_QUEUE_BACKEND", "rabbitmq"),
                ("CORREU_DELIVERY_MX_PORT", "2500"),
                ("CORREU_SMTP_MAX_MESSAGE_SIZE", "1000"),
                ("CORREU_LOG", "debug"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(c.hostname, "mx.example.org");
        assert_eq!(c.smtp.max_recipients, 5);
        assert_eq!(c.smtp.command_timeout, Dur::secs(120));
        assert_eq!(c.smtp.listen.len(), 2);
        assert_eq!(c.smtp.max_message_size, 1000);
        assert_eq!(c.queue.backend, Some(QueueBackend::Rabbitmq));
        assert_eq!(c.delivery.mx_port, 2500);
        assert_eq!(c.delivery.routes["*"].host, "smarthost");
        assert_eq!(c.delivery.routes["*"].port, 587);
    }

    #[test]
    fn routes_as_strings_or_tables() {
        let c = load(
            "[delivery]\ntls = \"required\"\n[delivery.routes]\n\"a.org\" = \"mx.a.org:2525\"\n\"*\" = { host = \"relay.example\", port = 587, tls = \"opportunistic\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.delivery.tls, OutboundTls::Required);
        assert_eq!(c.delivery.routes["a.org"].port, 2525);
        assert_eq!(c.delivery.routes["*"].tls, Some(OutboundTls::Opportunistic));
        let e = load(
            "[delivery.routes]\n\"*\" = { host = \"r\", auth_user = \"u\", tls = \"none\" }\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(e),
            vec![
                "delivery.routes.*.auth_password_file",
                "delivery.routes.*.tls"
            ]
        );
    }

    #[test]
    fn shaping_rules_by_name_and_their_errors() {
        let c = load(
            "[delivery.shaping.google]\nmx = [\"*.google.com\"]\nmax_connections = 20\nmessage_rate = \"600/1m\"\nbackoff = \"5m\"\n",
            &[],
        )
        .unwrap();
        let g = &c.delivery.shaping["google"];
        assert_eq!(
            (g.max_connections, g.message_rate),
            (20, Rate::per(600, 60))
        );
        assert_eq!(g.backoff.get(), std::time::Duration::from_secs(300));
        let e = load(
            "[delivery.shaping.\"bad name\"]\nmax_connections = 0\n[delivery.shaping.b]\ndomains = [\"*.\", \"ok.example\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(e),
            vec![
                "delivery.shaping.b.domains[0]",
                "delivery.shaping.bad name",
                "delivery.shaping.bad name",
                "delivery.shaping.bad name.max_connections",
            ]
        );
        assert!(name_matches("*.google.com", "ASPMX.L.Google.com."));
        assert!(!name_matches("*.google.com", "google.com"));
        assert!(!name_matches("*.google.com", "xgoogle.com"));
        assert!(name_matches("Example.com", "example.COM"));
        // UTF-8 names (SMTPUTF8) are compared by bytes, never cut inside
        // a character.
        assert!(!name_matches("*.co.jp", "例え.jp"));
        assert!(name_matches("*.jp", "例え.jp"));
    }

    #[test]
    fn each_role_has_its_own_telemetry_port_unless_set() {
        let port = |role, text| load_as(role, text, &[]).unwrap().telemetry.listen.port();
        assert_eq!(port(Role::Serve, ""), 9725);
        assert_eq!(port(Role::Ingress, ""), 9725);
        assert_eq!(port(Role::Delivery, ""), 9726);
        assert_eq!(port(Role::Storage, ""), 9727);
        let set = "[telemetry]\nlisten = \"0.0.0.0:9999\"\n";
        assert_eq!(port(Role::Storage, set), 9999);
        let c = load_as(
            Role::Delivery,
            "",
            &[("CORREU_TELEMETRY_LISTEN", "0.0.0.0:9725")],
        )
        .unwrap();
        assert_eq!(c.telemetry.listen.port(), 9725);
    }

    #[test]
    fn a_malformed_broker_url_is_a_config_error() {
        let e = load("[queue]\nurl = \"amqp://guest:guest@[bad/%2f\"\n", &[]).unwrap_err();
        assert_eq!(keys(e.clone()), vec!["queue.url"]);
        assert!(!e.to_string().contains("guest"), "{e}");
    }

    #[test]
    fn moved_keys_say_where_they_went() {
        let e = load("[delivery]\ndata_timeout = \"10m\"\n", &[]).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "delivery.data_timeout: unknown key (it moved: delivery.timeouts.data_end)"
        );
        let c = load("[delivery.timeouts]\nrcpt = \"1m\"\n", &[]).unwrap();
        assert_eq!(c.delivery.timeouts.rcpt, Dur::secs(60));
        assert_eq!(c.delivery.timeouts.data_end, Dur::secs(600));
        let e = load("[delivery.timeouts]\nbanner = 0\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["delivery.timeouts.banner"]);
    }

    #[test]
    fn the_hop_limit_is_checked() {
        assert_eq!(load("", &[]).unwrap().smtp.max_hops, 100);
        assert_eq!(
            load("[smtp]\nmax_hops = 30\n", &[]).unwrap().smtp.max_hops,
            30
        );
        let e = load("[smtp]\nmax_hops = 0\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.max_hops"]);
    }

    #[test]
    fn submission_needs_tls() {
        let e = load(
            "[smtp]\nsubmission = [\"127.0.0.1:587\"]\ntls_certificate = \"/nonexistent.pem\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["smtp.tls_key", "smtp.tls_certificate"]);
    }

    #[test]
    fn every_error_names_its_key() {
        let e = load(
            "hostnme = \"x\"\n[smtp]\nmax_recipients = 0\nfoo = 1\n[storage]\nendpoint = \"storage:1\"\nmailboxes = [\"a@elsewhere.org\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            keys(e),
            vec![
                "hostnme",
                "smtp.foo",
                "smtp.max_recipients",
                "storage.endpoint",
                "storage.mailboxes[0]"
            ]
        );
    }

    #[test]
    fn a_trust_anchor_that_is_no_dnskey_file_is_an_error_and_dane_parses() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("anchor");
        std::fs::write(&bad, "not a key\n").unwrap();
        let e = load(
            &format!(
                "[dns]\ntrust_anchor = \"{}\"\n[delivery]\ntls = \"dane\"\n",
                bad.display()
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["dns.trust_anchor"]);
        let c = load(
            "[delivery.routes.\"a.example\"]\nhost = \"mx.a.example\"\nport = 25\ntls = \"dane\"\n",
            &[],
        )
        .unwrap();
        assert!(c.delivery.uses_dane());
        assert!(!load("", &[]).unwrap().delivery.uses_dane());
    }

    #[test]
    fn type_errors_name_the_key_and_the_variable() {
        let e = load("[smtp]\nlisten = [\"nowhere\"]\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["smtp.listen[0]"]);
        let e = load("", &[("CORREU_SMTP_MAX_RECIPIENTS", "many")]).unwrap_err();
        assert_eq!(
            e.0[0].key,
            "smtp.max_recipients (from CORREU_SMTP_MAX_RECIPIENTS)"
        );
        let e = load("", &[("CORREU_NOPE", "1")]).unwrap_err();
        assert_eq!(e.0[0].key, "nope (from CORREU_NOPE)");
        let e = load("[queue]\npublish_timeout = \"10 parsecs\"\n", &[]).unwrap_err();
        assert_eq!(keys(e), vec!["queue.publish_timeout"]);
        let e = load("[smtp\n", &[]).unwrap_err();
        assert!(e.0[0].message.starts_with("not valid TOML"), "{e}");
    }
}
