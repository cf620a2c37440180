//! Access control that is pure policy: IP allowlists, the PROXY protocol reader, and
//! role-based authorization.

pub mod authz;
pub mod cidr;
pub mod grant;
pub mod proxy_protocol;
