//! Requests over the transport's message limit. tonic refuses a message longer than
//! [`Limits::max_request_bytes`] from its length prefix, before reading it, with
//! `OUT_OF_RANGE: decoded message length too large`. This layer turns that answer into
//! the form every other limit has: `RESOURCE_EXHAUSTED` naming
//! `limits.max_total_file_bytes`, and audits it as a `request_refused` event, since the
//! handler (and so the caller's identity) was never reached.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Code, Status};

use crate::audit::{Audit, AuditEvent};
use crate::command::Limits;
use crate::connection::ConnInfo;

/// The start of tonic's message for a request over `max_decoding_message_size`
/// (tonic 0.14 `codec/decode.rs`); followed by `: found N bytes, the limit is: M bytes`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// A tower layer over the gRPC routes that rewrites tonic's over-size refusal.
#[derive(Clone)]
pub struct OversizedRequests {
    inner: Arc<Settings>,
}

struct Settings {
    max_total_file_bytes: u64,
    max_request_bytes: usize,
    audit: Audit,
}

impl OversizedRequests {
    /// The layer for a gateway with these limits, auditing refusals to `audit`.
    pub fn new(limits: &Limits, audit: Audit) -> Self {
        Self {
            inner: Arc::new(Settings {
                max_total_file_bytes: limits.max_total_file_bytes,
                max_request_bytes: limits.max_request_bytes(),
                audit,
            }),
        }
    }
}

impl<S> tower::Layer<S> for OversizedRequests {
    type Service = OversizedRequestsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizedRequestsService {
            inner,
            settings: self.inner.clone(),
        }
    }
}

/// The service [`OversizedRequests`] wraps around the routes.
#[derive(Clone)]
pub struct OversizedRequestsService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B, R> tower::Service<http::Request<B>> for OversizedRequestsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let method = req.uri().path().to_owned();
        let settings = self.settings.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            // a unary request that failed to decode is answered trailers-only: the
            // status is in the headers
            let Some(status) = Status::from_header_map(response.headers()) else {
                return Ok(response);
            };
            if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
                return Ok(response);
            }
            let refusal = settings.refusal(found_bytes(status.message()));
            settings.audit.record(AuditEvent::RequestRefused {
                listener: conn
                    .as_ref()
                    .map(|c| c.listener.to_string())
                    .unwrap_or_default(),
                source: conn.map(|c| c.source.to_string()).unwrap_or_default(),
                principal: None,
                method,
                code: format!("{:?}", refusal.code()),
                reason: refusal.message().to_owned(),
            });
            let headers = response.headers_mut();
            headers.remove("grpc-status");
            headers.remove("grpc-message");
            headers.remove("grpc-status-details-bin");
            if refusal.add_header(headers).is_err() {
                tracing::warn!("could not rewrite an over-size refusal's status");
            }
            Ok(response)
        })
    }
}

impl Settings {
    fn refusal(&self, found: Option<u64>) -> Status {
        let got = found.map_or_else(String::new, |n| format!(" (got a {n}-byte request)"));
        Status::resource_exhausted(format!(
            "request size exceeds the gateway limit limits.max_total_file_bytes = {} bytes of \
             attached files{got}; with file paths, the command line and framing a request may \
             be at most {} bytes: attach fewer or smaller files",
            self.max_total_file_bytes, self.max_request_bytes
        ))
    }
}

/// The `found N bytes` of tonic's message.
fn found_bytes(message: &str) -> Option<u64> {
    let rest = message.split("found ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_tonic_found_is_read_from_its_message() {
        assert_eq!(
            found_bytes(
                "Error, decoded message length too large: found 5347737 bytes, the limit is: 5300000 bytes"
            ),
            Some(5_347_737)
        );
        assert_eq!(found_bytes("Error, decoded message length too large"), None);
    }
}
