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
