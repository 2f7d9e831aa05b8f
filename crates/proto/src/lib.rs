//! Correu's wire types, generated from `proto/` at build time: the queued
//! message envelope and the storage gRPC service. Nothing here is written by
//! hand; change the `.proto` files instead.
#![forbid(unsafe_code)]

/// `correu.v1`: the queue envelope and the storage service.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("correu.v1");
}

pub use prost::Message;

/// The encoded descriptors of every Correu proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/correu_descriptor.bin"));
