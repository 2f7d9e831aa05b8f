//! How ingress, delivery and the operator's commands call storage: one
//! HTTP/2 channel, made lazily (storage may start after its callers), with
//! a deadline on every call; or, inside `correu serve`, the same gRPC calls
//! answered by the storage service in the same process, without a socket
//! (storage makes that transport: `correu_storage::local_client`).

use std::sync::Arc;
use std::task::{Context, Poll};

use correu_proto::v1::storage_client::StorageClient;
use correu_runtime::config::StorageConfig;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::transport::{Channel, Endpoint};

pub type Client = StorageClient<Transport>;

/// A gRPC server in this process, as a function from an HTTP request to
/// its response (tonic's generated servers are always ready).
pub type LocalService = Arc<
    dyn Fn(http::Request<Body>) -> BoxFuture<http::Response<Body>, std::convert::Infallible>
        + Send
        + Sync,
>;

/// How calls reach storage: over HTTP/2, or to the service in this process
/// (the same request and response messages, codecs and status codes).
#[derive(Clone)]
pub enum Transport {
    Remote(Channel),
    /// The service in this process, with the deadline the network server
    /// would apply (`storage.request_timeout`).
    Local(LocalService, std::time::Duration),
}

impl Service<http::Request<Body>> for Transport {
    type Response = http::Response<Body>;
    type Error = StdError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Transport::Remote(c) => c.poll_ready(cx).map_err(Into::into),
            Transport::Local(..) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match self {
            Transport::Remote(c) => {
                let call = c.call(req);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            Transport::Local(s, deadline) => {
                let (call, deadline) = (s(req), *deadline);
                Box::pin(async move {
                    match tokio::time::timeout(deadline, call).await {
                        Ok(r) => r.map_err(Into::into),
                        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                            "storage did not answer within {deadline:?}"
                        ))
                        .into()),
                    }
                })
            }
        }
    }
}

fn client(transport: Transport) -> Client {
    StorageClient::new(transport)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A client for `endpoint`; fails only when the endpoint is not a URI.
pub fn connect(cfg: &StorageConfig, endpoint: &str) -> Result<Client, tonic::transport::Error> {
    let timeout = cfg.request_timeout.get();
    let channel = Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(client(Transport::Remote(channel)))
}

/// A client whose calls `service` answers in this process (`correu
/// serve`), with `storage.request_timeout` as their deadline.
pub fn local(cfg: &StorageConfig, service: LocalService) -> Client {
    client(Transport::Local(service, cfg.request_timeout.get()))
}

/// A request carrying the current trace context (W3C `traceparent` in the
/// gRPC metadata), so storage's span joins the caller's trace.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    for (k, v) in correu_runtime::telemetry::inject() {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::MetadataValue::try_from(v.as_str()),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    req
}

/// The trace context a request carries, as headers.
pub fn trace_headers<T>(req: &tonic::Request<T>) -> std::collections::HashMap<String, String> {
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| {
            let v = req.metadata().get(k)?.to_str().ok()?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A readiness check: storage answers a call (an empty address gets
/// `INVALID_ARGUMENT` without touching a disk; any answer will do).
pub fn ready_check(client: Client) -> correu_runtime::health::Check {
    std::sync::Arc::new(move || {
        let mut c = client.clone();
        Box::pin(async move {
            match c
                .check_recipient(correu_proto::v1::CheckRecipientRequest {
                    address: String::new(),
                    size: 0,
                })
                .await
            {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            }
        })
    })
}
