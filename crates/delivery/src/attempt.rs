//! One attempt on a message: each local recipient through storage's
//! `Deliver`, each remote domain through its hops (a route, or its MX hosts
//! by preference), each hop with its TLS policy (opportunistic, required,
//! or what the domain's MTA-STS policy demands), its connection lease and a
//! kept connection when there is one. Every failure becomes an [`Outcome`]
//! in crate::outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use correu_proto::v1::{DeliverRequest, QueuedMessage};
use correu_runtime::config::OutboundTls;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::Instrument;

use crate::client::{self, Client, Phase, Transaction};
use crate::outcome::{self, Outcome};
use crate::{Deliverer, dane, mta_sts, pool, route, tls};
use crate::{shaping, tlsrpt};

impl Deliverer {
    /// Every recipient's outcome, in the order of `msg.recipients`. Work
    /// not finished within `delivery.attempt_timeout` is a temporary failure.
    pub(crate) async fn deliver_all(&self, msg: &QueuedMessage) -> Attempt {
        let deadline = tokio::time::Instant::now() + self.attempt_timeout;
        let late = || {
            Outcome::temp(
                "4.4.7",
                format!("attempt took longer than {:?}", self.attempt_timeout),
            )
        };
        let mut outcomes = vec![Outcome::temp("4.4.7", "not attempted"); msg.recipients.len()];
        let mut via = vec![None; msg.recipients.len()];
        let mut hosts = vec![None; msg.recipients.len()];
        // Remote recipients grouped by domain and envelope sender (an
        // alias's forwarded copies go out from their SRS address): one
        // transaction each.
        let mut remote: BTreeMap<(String, &str), Vec<usize>> = BTreeMap::new();
        for (i, r) in msg.recipients.iter().enumerate() {
            if self.is_local(&r.address) {
                outcomes[i] =
                    tokio::time::timeout_at(deadline, self.deliver_local(msg, &r.address))
                        .await
                        .unwrap_or_else(|_| late());
            } else if let Some(o) = self.suppressed(&msg.queue_id, &r.address).await {
                outcomes[i] = o;
            } else {
                let domain = r
                    .address
                    .rsplit_once('@')
                    .map_or("", |(_, d)| d)
                    .to_lowercase();
                let sender = if r.sender.is_empty() {
                    &msg.sender
                } else {
                    &r.sender
                };
                remote.entry((domain, sender)).or_default().push(i);
            }
        }
        let content = if remote.is_empty() {
            None
        } else {
            self.signed(msg).await
        };
        let content = content.as_deref().unwrap_or(&msg.content);
        for ((domain, sender), idx) in remote {
            let got = tokio::time::timeout_at(
                deadline,
                self.deliver_remote(msg, sender, content, &domain, &idx),
            )
            .await
            .unwrap_or_else(|_| Remote::all(late(), idx.len()));
            for (k, &i) in idx.iter().enumerate() {
                outcomes[i] = got.outcomes[k].clone();
                via[i] = got.via.clone();
                hosts[i] = got.host.clone();
            }
        }
        Attempt {
            outcomes,
            via,
            hosts,
        }
    }

    /// A permanent failure for `rcpt` when it is on the suppression list;
    /// `None` to deliver (a list that cannot be read lets mail go).
    async fn suppressed(&self, queue_id: &str, rcpt: &str) -> Option<Outcome> {
        let list = self.suppression.as_ref()?;
        match list.get(rcpt).await {
            Ok(Some(e)) => Some(Outcome::Permanent(outcome::Failure {
                status: if e.status.starts_with('5') {
                    e.status
                } else {
                    "5.1.1".into()
                },
                text: format!(
                    "{rcpt} is on the suppression list ({}, for {} more): {}",
                    e.class,
                    humantime(e.expires.saturating_sub(e.added.max(now_secs()))),
                    e.reason
                ),
                remote_mta: None,
                smtp_reply: None,
                suppressed: true,
            })),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(%queue_id, recipient = %rcpt, error = %err, "cannot read the suppression list; delivering");
                None
            }
        }
    }

    async fn deliver_local(&self, msg: &QueuedMessage, rcpt: &str) -> Outcome {
        let req = DeliverRequest {
            queue_id: msg.queue_id.clone(),
            sender: msg.sender.clone(),
            recipient: rcpt.to_string(),
            content: msg.content.clone(),
            received_at_unix_micros: msg.received_at_unix_micros,
            folder: msg.folder.clone(),
        };
        let mut client = self.storage.clone();
        let span = tracing::info_span!(
            "storage.deliver",
            queue_id = %msg.queue_id,
            "rpc.system" = "grpc",
            "rpc.service" = "correu.v1.Storage",
            "rpc.method" = "Deliver",
            "otel.kind" = "client",
            "rpc.grpc.status_code" = tracing::field::Empty,
            "otel.status_description" = tracing::field::Empty,
        );
        let req = span.in_scope(|| correu_storage_client::traced(req));
        match timeout(self.storage_timeout, client.deliver(req))
            .instrument(span.clone())
            .await
        {
            Ok(Ok(_)) => {
                span.record("rpc.grpc.status_code", 0_i64);
                Outcome::LOCAL
            }
            Ok(Err(status)) => {
                span.record("rpc.grpc.status_code", status.code() as i64);
                span.record("otel.status_description", status.message());
                outcome::from_status(&status)
            }
            Err(_) => {
                span.record("otel.status_description", "storage did not answer in time");
                Outcome::temp(
                    "4.3.0",
                    format!("storage did not answer within {:?}", self.storage_timeout),
                )
            }
        }
    }

    /// The message with a DKIM signature when its From: domain has a key
    /// (signing runs on the blocking pool); `None` to send it as it is.
    async fn signed(&self, msg: &QueuedMessage) -> Option<Vec<u8>> {
        if self.dkim.is_empty() {
            return None;
        }
        let (dkim, content) = (self.dkim.clone(), msg.content.clone());
        let signed = tokio::task::spawn_blocking(move || {
            dkim.sign(&content)
                .map(|header| header.map(|h| [h.into_bytes(), content].concat()))
        })
        .await;
        match signed {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                tracing::error!(queue_id = %msg.queue_id, error = %e, "DKIM signing failed; sending unsigned");
                None
            }
            Err(e) => {
                tracing::error!(queue_id = %msg.queue_id, error = %e, "DKIM signing task failed; sending unsigned");
                None
            }
        }
    }

    /// Tries the domain's hops in order until one gives every recipient an
    /// answer. `rcpts` are indexes into `msg.recipients`; `content` is the
    /// message as it goes out (signed, when it is).
    async fn deliver_remote(
        &self,
        msg: &QueuedMessage,
        sender: &str,
        content: &[u8],
        domain: &str,
        rcpts: &[usize],
    ) -> Remote {
        let hops = match self.router.hops(domain).await {
            Ok(h) => h,
            Err(o) => return Remote::all(o, rcpts.len()),
        };
        // A TLS report goes despite the failures it reports (RFC 8460
        // §5.3): no MTA-STS for it.
        let (mut hops, sts) = if msg.tls_report {
            (hops, None)
        } else {
            match self.apply_mta_sts(&msg.queue_id, domain, hops).await {
                Ok(h) => h,
                Err(o) => return Remote::all(o, rcpts.len()),
            }
        };
        // REQUIRETLS (RFC 8689 §4.2.1): only an authenticated next hop (a
        // route the operator set, an MX host an MTA-STS policy names, or,
        // where delivery validates DNSSEC, an MX record proven secure), and
        // verified TLS to it: DANE where the host publishes TLSA records,
        // else its certificate checked against CAs.
        if msg.requiretls {
            let dnssec = self.router.validating();
            let named = |h: &route::Hop| sts.as_ref().is_some_and(|p| p.names(&h.host));
            hops.retain(|h| h.route.is_some() || named(h) || (dnssec && h.secure));
            if hops.is_empty() {
                let o = Outcome::Permanent(outcome::Failure {
                    status: "5.7.10".into(),
                    text: format!(
                        "REQUIRETLS: no MX host of {domain} is authenticated (by an MTA-STS policy or DNSSEC)"
                    ),
                    remote_mta: None,
                    smtp_reply: None,
                    suppressed: false,
                });
                return Remote::all(o, rcpts.len());
            }
            for h in &mut hops {
                h.tls = Some(if h.route.is_none() && !named(h) {
                    OutboundTls::Dane
                } else {
                    OutboundTls::Required
                });
            }
        }
        if !self
            .rates
            .allow("domain-msg", domain, self.domain_rate)
            .await
        {
            let o = Outcome::temp("4.4.5", format!("{domain} is at its message rate; waiting"));
            return Remote::all(o, rcpts.len());
        }
        let mut last_via = None;
        let mut last = Outcome::temp("4.4.4", format!("no host to deliver to for {domain}"));
        let mut rated: Vec<String> = Vec::new();
        let mut last_host = None;
        for mut hop in hops {
            last_host = Some(hop.host.clone());
            let dest = self.shaping.dest(domain, &hop.host);
            if hop.tls.is_none() {
                hop.tls = dest.tls;
            }
            // A destination that said to slow down is left alone (by
            // every delivery process) for its backoff; others go on.
            if let Some(left) = self.rates.held("backoff", &dest.budget).await {
                last = Outcome::temp(
                    "4.4.5",
                    format!(
                        "{} asked to slow down; holding off for {}s more",
                        dest.site.as_deref().unwrap_or(&hop.host),
                        left.as_secs() + 1
                    ),
                );
                continue;
            }
            // One message counts once against a site's rate, however many
            // of its hosts are tried.
            if !rated.contains(&dest.budget)
                && !self
                    .rates
                    .allow("site-msg", &dest.budget, dest.message_rate)
                    .await
            {
                last = Outcome::temp(
                    "4.4.5",
                    format!(
                        "{} is at its message rate; waiting",
                        dest.site.as_deref().unwrap_or(&hop.host)
                    ),
                );
                continue;
            }
            rated.push(dest.budget.clone());
            let (addrs, addrs_secure) = match self.router.addresses(&hop).await {
                Ok((a, secure)) if !a.is_empty() => (a, secure),
                Ok(_) => {
                    last = Outcome::temp("4.4.4", format!("{} has no address", hop.host));
                    continue;
                }
                // A DNS failure (4.4.3), never a TLS one: REQUIRETLS
                // bounces on 4.7.5, and this may pass.
                Err(e @ route::ResolveError::Bogus(_)) => {
                    last = Outcome::temp("4.4.3", e.to_string());
                    continue;
                }
                Err(e) => {
                    last = Outcome::temp("4.4.4", e.to_string());
                    continue;
                }
            };
            // DANE (RFC 7672 §2.2): TLSA records count only for a host
            // whose name and addresses DNSSEC proved. Where delivery
            // validates, an MX host's usable records also win over
            // required TLS (MTA-STS enforce, REQUIRETLS, a rule's
            // `required`): RFC 8461 §2 lets MTA-STS never override a
            // failing DANE. A route's host only when the route asks.
            let level = hop.tls.unwrap_or(self.tls_default);
            if self.router.validating()
                && hop.secure
                && addrs_secure
                && (level == OutboundTls::Dane
                    || (level == OutboundTls::Required && hop.route.is_none()))
            {
                match dane::lookup(&self.router.resolver, &hop.host, hop.port).await {
                    Ok(policy) => hop.dane = policy,
                    Err(why) => {
                        tracing::warn!(queue_id = %msg.queue_id, mx = %hop.host, error = %why, "DANE: TLSA records unknown; not delivering to this host");
                        last = Outcome::temp("4.4.3", why);
                        continue;
                    }
                }
            }
            // A REQUIRETLS message goes over verified TLS only: DANE's,
            // or the certificate checked against CAs.
            if msg.requiretls && hop.dane.as_ref().is_none_or(|p| p.records.is_empty()) {
                hop.tls = Some(OutboundTls::Required);
            }
            for addr in addrs {
                let span = tracing::info_span!(
                    "delivery.attempt",
                    queue_id = %msg.queue_id,
                    mx = %hop.host,
                    %addr,
                    "otel.kind" = "client",
                    "server.address" = %hop.host,
                    "server.port" = i64::from(addr.port()),
                    "network.peer.address" = %addr.ip(),
                    "network.peer.port" = i64::from(addr.port()),
                    "network.protocol.name" = "smtp",
                    "tls.protocol.version" = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                    "smtp.reply.code" = tracing::field::Empty,
                    "otel.status_description" = tracing::field::Empty,
                );
                // Boxed: a session's state would otherwise sit in every
                // delivery's future.
                let tried =
                    Box::pin(self.try_host(msg, sender, content, (&hop, &dest), addr, rcpts))
                        .instrument(span.clone())
                        .await;
                if let Some(reports) = &self.tls_reports
                    && hop.route.is_none()
                    && !msg.tls_report
                    && !matches!(self.policy(&hop), tls::TlsPolicy::None)
                {
                    // One count per session: a kept connection's later
                    // transactions are the same session.
                    let failure = match &tried {
                        Ok((_, via)) if via.conn_use <= 1 => Some(
                            via.tls_version
                                .is_empty()
                                .then_some("starttls-not-supported"),
                        ),
                        Err(HostError::Session(e)) => tlsrpt::result_type(e).map(Some),
                        _ => None,
                    };
                    if let Some(failure) = failure {
                        let session = tlsrpt::Session {
                            domain,
                            policy: sts.as_deref(),
                            tlsa: hop.dane.as_ref().map(|p| p.published.as_slice()),
                            mx: &hop.host,
                            ip: addr.ip(),
                            failure,
                        };
                        // Boxed: kept out of every delivery's future.
                        Box::pin(reports.record(&session)).await;
                    }
                }
                let slowed = match &tried {
                    Ok((outcomes, _)) => outcomes.iter().find(|o| shaping::slows_down(o)).cloned(),
                    Err(HostError::Session(e)) => {
                        Some(outcome::from_session_error(e, &hop.host, addr))
                            .filter(shaping::slows_down)
                    }
                    Err(_) => None,
                };
                if let Some(o) = slowed {
                    tracing::warn!(
                        queue_id = %msg.queue_id,
                        mx = %hop.host,
                        site = dest.site.as_deref().unwrap_or(""),
                        backoff = ?dest.backoff,
                        reply = o.reply_code().unwrap_or(0),
                        "destination asked to slow down; holding off"
                    );
                    self.rates.hold("backoff", &dest.budget, dest.backoff).await;
                }
                match &tried {
                    Ok((outcomes, via)) => {
                        let delivered = outcomes.iter().filter(|o| o.is_delivered()).count();
                        span.record(
                            "outcome",
                            if delivered == outcomes.len() {
                                "delivered"
                            } else if delivered > 0 {
                                "partial"
                            } else {
                                "refused"
                            },
                        );
                        if let Some(code) = outcomes.iter().find_map(Outcome::reply_code) {
                            span.record("smtp.reply.code", i64::from(code));
                        }
                        if let Some(v) = via.tls_version.strip_prefix("TLSv") {
                            span.record("tls.protocol.version", v);
                        }
                        if let Some(Outcome::Temporary(f) | Outcome::Permanent(f)) =
                            outcomes.iter().find(|o| !o.is_delivered())
                        {
                            let why = format!("{} {}", f.status, f.text);
                            span.record("otel.status_description", why.as_str());
                        }
                    }
                    Err(HostError::Busy(why)) => {
                        span.record("outcome", "busy");
                        span.record("otel.status_description", *why);
                    }
                    Err(HostError::Session(e)) => {
                        span.record("outcome", "error");
                        span.record("otel.status_description", e.to_string().as_str());
                    }
                }
                match tried {
                    Ok((outcomes, via)) => {
                        return Remote {
                            outcomes,
                            via: Some(Arc::new(via)),
                            host: Some(hop.host.clone()),
                        };
                    }
                    // Connections per host are shared by every delivery
                    // pod; a host that stays busy is passed over, and if
                    // all are, the message waits in a retry tier.
                    Err(HostError::Busy(why)) => {
                        last = Outcome::temp(
                            "4.4.5",
                            format!(
                                "{} is at its {why}; waiting",
                                dest.site.as_deref().unwrap_or(&hop.host)
                            ),
                        );
                    }
                    Err(HostError::Session(e)) => {
                        tracing::info!(queue_id = %msg.queue_id, mx = %hop.host, %addr, error = %e, "next hop failed; trying the next");
                        last = outcome::from_session_error(&e, &hop.host, addr);
                        last_via = Some(Arc::new(Via::failed(&hop.host, addr)));
                    }
                }
            }
        }
        // A REQUIRETLS message that found no verified TLS bounces rather
        // than waits (RFC 8689 §5).
        if msg.requiretls
            && let Outcome::Temporary(f) = &last
            && f.status == "4.7.5"
        {
            last = Outcome::Permanent(outcome::Failure {
                status: "5.7.10".into(),
                text: format!(
                    "REQUIRETLS: no verified TLS to a host of {domain}: {}",
                    f.text
                ),
                ..f.clone()
            });
        }
        Remote {
            outcomes: vec![last; rcpts.len()],
            via: last_via,
            host: last_host,
        }
    }

    /// MX hops of a domain with an MTA-STS policy: in `enforce` mode only
    /// the hosts it names, each with verified TLS; in `testing` mode the
    /// same hops, with the ones it would refuse logged. A configured route
    /// is the operator's word and is left alone.
    /// Also returns the policy that applied (for TLS reports).
    async fn apply_mta_sts(
        &self,
        queue_id: &str,
        domain: &str,
        mut hops: Vec<route::Hop>,
    ) -> Result<(Vec<route::Hop>, Option<Arc<mta_sts::Policy>>), Outcome> {
        let Some(sts) = &self.mta_sts else {
            return Ok((hops, None));
        };
        if hops.iter().any(|h| h.route.is_some()) {
            return Ok((hops, None));
        }
        let Some(policy) = sts.policy(domain).await else {
            return Ok((hops, None));
        };
        match policy.mode {
            mta_sts::Mode::None => {}
            mta_sts::Mode::Testing => {
                for h in hops.iter().filter(|h| !policy.names(&h.host)) {
                    tracing::warn!(%queue_id, %domain, mx = %h.host, "MX not in the domain's MTA-STS policy (testing mode: delivering anyway)");
                }
            }
            mta_sts::Mode::Enforce => {
                hops.retain(|h| policy.names(&h.host));
                if hops.is_empty() {
                    return Err(Outcome::temp(
                        "4.7.5",
                        format!("no MX host of {domain} is named in its MTA-STS policy"),
                    ));
                }
                for h in &mut hops {
                    h.tls = Some(OutboundTls::Required);
                }
            }
        }
        let applied = (policy.mode != mta_sts::Mode::None).then_some(policy);
        Ok((hops, applied))
    }

    fn policy(&self, hop: &route::Hop) -> tls::TlsPolicy {
        let level = hop.tls.unwrap_or(self.tls_default);
        match (&hop.dane, level) {
            (_, OutboundTls::None) => tls::TlsPolicy::None,
            // Usable TLSA records authenticate the host, whatever else
            // asked for TLS.
            (Some(p), _) if !p.records.is_empty() => {
                tls::TlsPolicy::Dane(p.connector.clone(), true)
            }
            // Records, none usable: mandatory TLS, unauthenticated.
            (Some(p), OutboundTls::Dane) => tls::TlsPolicy::Dane(p.connector.clone(), false),
            (_, OutboundTls::Required) => self.required.clone(),
            // No DANE policy (no TLSA records, or an insecure zone):
            // opportunistic, as Postfix's `dane` level.
            (_, OutboundTls::Opportunistic | OutboundTls::Dane) => self.opportunistic.clone(),
        }
    }

    async fn try_host(
        &self,
        msg: &QueuedMessage,
        sender: &str,
        content: &[u8],
        (hop, dest): (&route::Hop, &shaping::Dest),
        addr: std::net::SocketAddr,
        rcpts: &[usize],
    ) -> Result<(Vec<Outcome>, Via), HostError> {
        let params: Vec<client::RcptParams> = rcpts
            .iter()
            .map(|&i| {
                let r = &msg.recipients[i];
                client::RcptParams {
                    address: &r.address,
                    notify: &r.notify,
                    orcpt: &r.orcpt,
                }
            })
            .collect();
        let t = Transaction {
            sender,
            recipients: &params,
            content,
            smtputf8: msg.smtputf8,
            requiretls: msg.requiretls,
            ret: &msg.dsn_ret,
            envid: &msg.dsn_envid,
        };
        let key = pool::Key {
            addr,
            host: hop.host.clone(),
            route: hop.route.as_ref().map(|r| format!("{r:?}")),
            // A DANE host's connections are not shared with the same
            // host's opportunistic or CA-verified ones.
            tls: Some(match self.policy(hop) {
                tls::TlsPolicy::None => OutboundTls::None,
                tls::TlsPolicy::Opportunistic(_) => OutboundTls::Opportunistic,
                tls::TlsPolicy::Required(_) => OutboundTls::Required,
                tls::TlsPolicy::Dane(..) => OutboundTls::Dane,
            }),
            budget: dest.budget.clone(),
        };
        // A connection kept from an earlier message, if one is fresh, with
        // its lease; one that fails before any reply is simply dropped for
        // another. Over the host's limit, the first connection put back
        // or lease given back is taken.
        let lease = loop {
            let slot = self.slot(&key, dest).await;
            let mut kept = match slot.ok_or(HostError::Busy("connection limit"))? {
                pool::Slot::New(lease) => {
                    if !self
                        .rates
                        .allow("site-conn", &dest.budget, dest.connection_rate)
                        .await
                    {
                        self.release(lease).await;
                        return Err(HostError::Busy("connection rate"));
                    }
                    break lease;
                }
                pool::Slot::Kept(kept) => kept,
            };
            if !self.leases.renew(&mut kept.lease).await {
                tracing::debug!(mx = %hop.host, "a kept connection's lease had expired; closing it");
                kept.client.quit().await;
                continue;
            }
            let started = std::time::Instant::now();
            match kept.client.deliver(&t).await {
                Ok(outcomes) => {
                    kept.client.uses += 1;
                    let via = Via::of(&kept.client, &hop.host, addr, started.elapsed(), true);
                    self.keep_or_quit(key, kept, dest).await;
                    return Ok((outcomes, via));
                }
                Err(e) if kept.client.body_sent() => {
                    // The server may have the message: no second copy
                    // now; the retry tiers decide.
                    self.release(kept.lease).await;
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::debug!(mx = %hop.host, error = %e, "a kept connection had gone stale; reconnecting");
                    self.release(kept.lease).await;
                }
            }
        };
        match self.connect(hop, addr).await {
            Ok(mut client) => {
                let started = std::time::Instant::now();
                match client.deliver(&t).await {
                    Ok(outcomes) => {
                        client.uses = 1;
                        let via = Via::of(&client, &hop.host, addr, started.elapsed(), false);
                        self.keep_or_quit(key, pool::Kept { client, lease }, dest)
                            .await;
                        Ok((outcomes, via))
                    }
                    Err(e) => {
                        self.release(lease).await;
                        Err(e.into())
                    }
                }
            }
            Err(e) => {
                self.release(lease).await;
                Err(e.into())
            }
        }
    }

    /// A TCP connection to `addr`, within the connect timeout.
    async fn dial(
        &self,
        hop: &route::Hop,
        addr: std::net::SocketAddr,
    ) -> Result<Client, client::SessionError> {
        let wait = self.timeouts.connect;
        let started = std::time::Instant::now();
        let stream = match timeout(wait, TcpStream::connect(addr)).await {
            Err(_) => return Err(client::SessionError::Timeout(Phase::Connect, wait)),
            Ok(r) => r?,
        };
        stream.set_nodelay(true)?;
        let mut c = Client::new(stream, &hop.host, self.timeouts);
        c.connect_time = started.elapsed();
        Ok(c)
    }

    /// Opens a session with `hop` at `addr`: EHLO, STARTTLS as the hop's
    /// policy says, AUTH when its route has credentials.
    async fn connect(
        &self,
        hop: &route::Hop,
        addr: std::net::SocketAddr,
    ) -> Result<Client, client::SessionError> {
        let mut c = self.dial(hop, addr).await?;
        let policy = self.policy(hop);
        match c.hello(&self.hostname, &policy).await {
            Ok(()) => {}
            // Nothing demands TLS of this hop (no MTA-STS enforce, no
            // required route): as Postfix's `may`, the same host again in
            // plaintext rather than never.
            Err(client::SessionError::TlsHandshake(why))
                if matches!(policy, tls::TlsPolicy::Opportunistic(_)) =>
            {
                tracing::warn!(mx = %hop.host, %addr, error = %why, "STARTTLS handshake failed; delivering in plaintext (opportunistic TLS)");
                c = self.dial(hop, addr).await?;
                c.hello(&self.hostname, &tls::TlsPolicy::None).await?;
            }
            Err(e) => return Err(e),
        }
        if let Some(route) = &hop.route
            && let (Some(user), Some(file)) = (&route.auth_user, &route.auth_password_file)
        {
            let password = tokio::fs::read_to_string(file).await?;
            c.authenticate(user, password.trim_end_matches(['\r', '\n']))
                .await?;
        }
        if let Some(tls) = &c.tls {
            tracing::debug!(mx = %hop.host, tls = %tls, "TLS on");
        }
        Ok(c)
    }
}

/// Every recipient's outcome, and for remote ones the host that gave it.
pub(crate) struct Attempt {
    pub outcomes: Vec<Outcome>,
    pub via: Vec<Option<Arc<Via>>>,
    /// The last host tried for each remote recipient, connected or not
    /// (its shaping rule decides the retry schedule).
    pub hosts: Vec<Option<String>>,
}

/// What the hops of one domain gave its recipients.
struct Remote {
    outcomes: Vec<Outcome>,
    via: Option<Arc<Via>>,
    host: Option<String>,
}

impl Remote {
    /// The same outcome for all `n`, no host tried.
    fn all(o: Outcome, n: usize) -> Remote {
        Remote {
            outcomes: vec![o; n],
            via: None,
            host: None,
        }
    }
}

/// The host a transaction went to, and how long each phase took, for the
/// delivery log line and events.
#[derive(Debug, Default)]
pub(crate) struct Via {
    pub relay: String,
    pub addr: Option<std::net::SocketAddr>,
    /// Zero on a kept connection (nothing was set up for this message).
    pub connect: Duration,
    pub tls: Duration,
    /// MAIL FROM to the reply after the final dot.
    pub transfer: Duration,
    pub tls_version: String,
    pub tls_cipher: String,
    /// How the certificate was checked: `dane`, `ca`, `none`; empty
    /// without TLS.
    pub tls_verify: &'static str,
    /// Transactions the connection has carried, this one included.
    pub conn_use: u32,
}

impl Via {
    fn of(
        c: &Client,
        relay: &str,
        addr: std::net::SocketAddr,
        transfer: Duration,
        kept: bool,
    ) -> Via {
        let (version, cipher) = match &c.tls {
            Some(t) => match t.split_once(" with cipher ") {
                Some((v, c)) => (v.to_string(), c.to_string()),
                None => (t.clone(), String::new()),
            },
            None => (String::new(), String::new()),
        };
        Via {
            relay: relay.to_string(),
            addr: Some(addr),
            connect: if kept { Duration::ZERO } else { c.connect_time },
            tls: if kept { Duration::ZERO } else { c.tls_time },
            transfer,
            tls_version: version,
            tls_cipher: cipher,
            tls_verify: c.tls_verify,
            conn_use: c.uses,
        }
    }

    fn failed(relay: &str, addr: std::net::SocketAddr) -> Via {
        Via {
            relay: relay.to_string(),
            addr: Some(addr),
            ..Via::default()
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `3d`, `5h`, `12m`, `40s`: the largest whole unit.
fn humantime(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Why a host got no transaction.
enum HostError {
    /// At its connection limit or connection rate (which of them).
    Busy(&'static str),
    Session(client::SessionError),
}

impl From<client::SessionError> for HostError {
    fn from(e: client::SessionError) -> Self {
        HostError::Session(e)
    }
}
