//! The tonic services. Thin: each RPC identifies the caller, checks what they may do,
//! parses its message into domain values and calls the runner, in straight-line code.

mod access_service;
mod command_service;
pub mod in_flight;
pub mod transport_refusals;
pub mod wire;

pub use access_service::AccessApi;
pub use command_service::CommandApi;
