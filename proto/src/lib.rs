//! The kinvoke gRPC contract (`kinvoke.v1`): messages, client and server stubs, and the
//! encoded descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all, clippy::pedantic)] // generated code

/// `kinvoke.v1`: the command and access services.
pub mod v1 {
    tonic::include_proto!("kinvoke.v1");
}

/// Encoded `FileDescriptorSet` of every kinvoke proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kinvoke_descriptor");
