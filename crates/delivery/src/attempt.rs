//! One attempt on a message: each local recipient through storage's
//! `Deliver`, each remote domain through its hops (a route, or its MX hosts
//! by preference), each hop with its TLS policy (opportunistic, required,
//! or what the domain's MTA-STS policy demands), its connection lease and a
//! kept connection when there is one. Every failure becomes an [`Outcome`]
//! in crate::outcome.

use std::collections::BTreeMap;

use correu_proto::v1::{DeliverRequest, QueuedMessage};
use correu_runtime::config::OutboundTls;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::Instrument;

use crate::client::{self, Client, Phase, Transaction};
use crate::outcome::{self, Outcome};
use crate::{Deliverer, mta_sts, pool, route, tls};

impl Deliverer {
    /// Every recipient's outcome, in the order of `msg.recipients`. Work
    /// not finished within `delivery.attempt_timeout` is a temporary failure.
    pub(crate) async fn deliver_all(&self, msg: &QueuedMessage) -> Vec<Outcome> {
        let deadline = tokio::time::Instant::now() + self.attempt_timeout;
        let late = || {
            Outcome::temp(
                "4.4.7",
                format!("attempt took longer than {:?}", self.attempt_timeout),
            )
        };
        let mut outcomes = vec![Outcome::temp("4.4.7", "not attempted"); msg.recipients.len()];
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
            .unwrap_or_else(|_| vec![late(); idx.len()]);
            for (k, &i) in idx.iter().enumerate() {
                outcomes[i] = got[k].clone();
            }
        }
        outcomes
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
        );
        let req = span.in_scope(|| correu_storage_client::traced(req));
        match timeout(self.storage_timeout, client.deliver(req))
            .instrument(span)
            .await
        {
            Ok(Ok(_)) => Outcome::LOCAL,
            Ok(Err(status)) => outcome::from_status(&status),
            Err(_) => Outcome::temp(
                "4.3.0",
                format!("storage did not answer within {:?}", self.storage_timeout),
            ),
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
    ) -> Vec<Outcome> {
        let hops = match self.router.hops(domain).await {
            Ok(h) => h,
            Err(o) => return vec![o; rcpts.len()],
        };
        let hops = match self.apply_mta_sts(&msg.queue_id, domain, hops).await {
            Ok(h) => h,
            Err(o) => return vec![o; rcpts.len()],
        };
        if !self
            .rates
            .allow("domain-msg", domain, self.domain_rate)
            .await
        {
            let o = Outcome::temp("4.4.5", format!("{domain} is at its message rate; waiting"));
            return vec![o; rcpts.len()];
        }
        let mut last = Outcome::temp("4.4.4", format!("no host to deliver to for {domain}"));
        for hop in hops {
            let addrs = match self.router.addresses(&hop).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    last = Outcome::temp("4.4.4", format!("{} has no address", hop.host));
                    continue;
                }
                Err(e) => {
                    last = Outcome::temp("4.4.4", e.to_string());
                    continue;
                }
            };
            for addr in addrs {
                let span = tracing::info_span!(
                    "delivery.attempt",
                    queue_id = %msg.queue_id,
                    mx = %hop.host,
                    %addr,
                    "server.address" = %hop.host,
                    "server.port" = addr.port(),
                    "network.peer.address" = %addr.ip(),
                    outcome = tracing::field::Empty,
                    "smtp.reply.code" = tracing::field::Empty,
                );
                let tried = self
                    .try_host(msg, sender, content, &hop, addr, rcpts)
                    .instrument(span.clone())
                    .await;
                match &tried {
                    Ok(outcomes) => {
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
                            span.record("smtp.reply.code", code);
                        }
                    }
                    Err(HostError::Busy) => {
                        span.record("outcome", "busy");
                    }
                    Err(HostError::Session(_)) => {
                        span.record("outcome", "error");
                    }
                }
                match tried {
                    Ok(outcomes) => return outcomes,
                    // Connections per host are shared by every delivery
                    // pod; a host that stays busy is passed over, and if
                    // all are, the message waits in a retry tier.
                    Err(HostError::Busy) => {
                        last = Outcome::temp(
                            "4.4.5",
                            format!("{} is at its connection limit; waiting", hop.host),
                        );
                    }
                    Err(HostError::Session(e)) => {
                        tracing::info!(queue_id = %msg.queue_id, mx = %hop.host, %addr, error = %e, "next hop failed; trying the next");
                        last = outcome::from_session_error(&e, &hop.host, addr);
                    }
                }
            }
        }
        vec![last; rcpts.len()]
    }

    /// MX hops of a domain with an MTA-STS policy: in `enforce` mode only
    /// the hosts it names, each with verified TLS; in `testing` mode the
    /// same hops, with the ones it would refuse logged. A configured route
    /// is the operator's word and is left alone.
    async fn apply_mta_sts(
        &self,
        queue_id: &str,
        domain: &str,
        mut hops: Vec<route::Hop>,
    ) -> Result<Vec<route::Hop>, Outcome> {
        let Some(sts) = &self.mta_sts else {
            return Ok(hops);
        };
        if hops.iter().any(|h| h.route.is_some()) {
            return Ok(hops);
        }
        let Some(policy) = sts.policy(domain).await else {
            return Ok(hops);
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
        Ok(hops)
    }

    fn policy(&self, hop: &route::Hop) -> &tls::TlsPolicy {
        match hop.tls.unwrap_or(self.tls_default) {
            OutboundTls::None => &tls::TlsPolicy::None,
            OutboundTls::Opportunistic => &self.opportunistic,
            OutboundTls::Required => &self.required,
        }
    }

    async fn try_host(
        &self,
        msg: &QueuedMessage,
        sender: &str,
        content: &[u8],
        hop: &route::Hop,
        addr: std::net::SocketAddr,
        rcpts: &[usize],
    ) -> Result<Vec<Outcome>, HostError> {
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
            ret: &msg.dsn_ret,
            envid: &msg.dsn_envid,
        };
        let key = pool::Key {
            addr,
            host: hop.host.clone(),
            route: hop.route.as_ref().map(|r| format!("{r:?}")),
            tls: hop.tls,
        };
        // A connection kept from an earlier message, if one is fresh, with
        // its lease; one that fails before any reply is simply dropped for
        // another. Over the host's limit, the first connection put back
        // or lease given back is taken.
        let lease = loop {
            let mut kept = match self.slot(&key).await.ok_or(HostError::Busy)? {
                pool::Slot::New(lease) => break lease,
                pool::Slot::Kept(kept) => kept,
            };
            if !self.leases.renew(&mut kept.lease).await {
                tracing::debug!(mx = %hop.host, "a kept connection's lease had expired; closing it");
                kept.client.quit().await;
                continue;
            }
            match kept.client.deliver(&t).await {
                Ok(outcomes) => {
                    self.keep_or_quit(key, kept).await;
                    return Ok(outcomes);
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
            Ok(mut client) => match client.deliver(&t).await {
                Ok(outcomes) => {
                    self.keep_or_quit(key, pool::Kept { client, lease }).await;
                    Ok(outcomes)
                }
                Err(e) => {
                    self.release(lease).await;
                    Err(e.into())
                }
            },
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
        let stream = match timeout(wait, TcpStream::connect(addr)).await {
            Err(_) => return Err(client::SessionError::Timeout(Phase::Connect, wait)),
            Ok(r) => r?,
        };
        stream.set_nodelay(true)?;
        Ok(Client::new(stream, &hop.host, self.timeouts))
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
        match c.hello(&self.hostname, policy).await {
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

/// Why a host got no transaction.
enum HostError {
    /// At its connection limit.
    Busy,
    Session(client::SessionError),
}

impl From<client::SessionError> for HostError {
    fn from(e: client::SessionError) -> Self {
        HostError::Session(e)
    }
}
