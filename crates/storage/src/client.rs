//! A storage client for ingress and delivery: one HTTP/2 channel, made
//! lazily (storage may start after its callers), with a deadline on every
//! call.

use correu_proto::v1::storage_client::StorageClient;
use correu_runtime::config::StorageConfig;
use tonic::transport::{Channel, Endpoint};

pub type Client = StorageClient<Channel>;

/// A client for `endpoint`; fails only when the endpoint is not a URI.
pub fn connect(cfg: &StorageConfig, endpoint: &str) -> Result<Client, tonic::transport::Error> {
    let timeout = cfg.request_timeout.get();
    let channel = Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(StorageClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
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
