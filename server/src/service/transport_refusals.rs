//! Requests the transport refuses before any handler runs, so before the caller is
//! identified; this layer rewrites tonic's answer into one a caller can act on and
//! audits it as a `request_refused` event:
//! - a message over [`Limits::max_request_bytes`], which tonic refuses from its length
//!   prefix before reading it with `OUT_OF_RANGE: decoded message length too large`,
//!   becomes `RESOURCE_EXHAUSTED` naming `limits.max_total_file_bytes`, the form every
//!   other limit has;
//! - a message that does not parse (a string that is not UTF-8, such as a file path
//!   sent as raw bytes) stays `INTERNAL`, as the gRPC status code table has it for a
//!   request that cannot be parsed, with a message saying what to send instead;
//! - a request that did not arrive whole in time (`limits.request_read_timeout`) keeps
//!   its `DEADLINE_EXCEEDED` and is audited too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Code, Status};

use crate::audit::{Audit, AuditEvent, Throttle, clip};
use crate::command::Limits;
use crate::connection::ConnInfo;
use crate::service::in_flight::MAX_AUDITED_METHOD;

/// The start of tonic's message for a request over `max_decoding_message_size`
/// (tonic 0.14 `codec/decode.rs`); followed by `: found N bytes, the limit is: M bytes`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// The start of prost's message for a message that does not parse (`prost::DecodeError`,
/// which tonic-prost passes on as `INTERNAL`).
const PROST_UNDECODABLE: &str = "failed to decode Protobuf message";

/// A tower layer over the gRPC routes that rewrites tonic's refusals of requests it
/// could not read.
#[derive(Clone)]
pub struct TransportRefusals {
    inner: Arc<Settings>,
}

struct Settings {
    max_total_file_bytes: u64,
    max_request_bytes: usize,
    audit: Audit,
    throttle: Arc<Throttle<String>>,
}

impl TransportRefusals {
    /// The layer for a gateway with these limits, auditing refusals to `audit`, at most
    /// as often per source as `throttle` allows.
    pub fn new(limits: &Limits, audit: Audit, throttle: Arc<Throttle<String>>) -> Self {
        Self {
            inner: Arc::new(Settings {
                max_total_file_bytes: limits.max_total_file_bytes,
                max_request_bytes: limits.max_request_bytes(),
                audit,
                throttle,
            }),
        }
    }
}

impl<S> tower::Layer<S> for TransportRefusals {
    type Service = TransportRefusalsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportRefusalsService {
            inner,
            settings: self.inner.clone(),
        }
    }
}

/// The service [`TransportRefusals`] wraps around the routes.
#[derive(Clone)]
pub struct TransportRefusalsService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B, R> tower::Service<http::Request<B>> for TransportRefusalsService<S>
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
            let refusal = if status.code() == Code::OutOfRange
                && status.message().starts_with(TONIC_TOO_LARGE)
            {
                settings.too_large(&method, found_bytes(status.message()))
            } else if status.code() == Code::Internal
                && status.message().starts_with(PROST_UNDECODABLE)
            {
                undecodable(status.message())
            } else if status.code() == Code::DeadlineExceeded
                && status.message().contains("limits.request_read_timeout")
            {
                // a request that never arrived whole (in_flight's DeadlineBody): answered
                // as it is, but audited like any refusal
                status
            } else {
                return Ok(response);
            };
            let source_ip = conn
                .as_ref()
                .map(|c| c.source.ip().to_string())
                .unwrap_or_default();
            settings
                .audit
                .record_throttled(&settings.throttle, &source_ip, |unrecorded_before| {
                    AuditEvent::RequestRefused {
                        listener: conn
                            .as_ref()
                            .map(|c| c.listener.to_string())
                            .unwrap_or_default(),
                        source: conn
                            .as_ref()
                            .map(|c| c.source.to_string())
                            .unwrap_or_default(),
                        principal: None,
                        method: clip(&method, MAX_AUDITED_METHOD),
                        code: format!("{:?}", refusal.code()),
                        reason: refusal.message().to_owned(),
                        unrecorded_before,
                    }
                });
            let headers = response.headers_mut();
            headers.remove("grpc-status");
            headers.remove("grpc-message");
            headers.remove("grpc-status-details-bin");
            if refusal.add_header(headers).is_err() {
                tracing::warn!("could not rewrite a transport refusal's status");
            }
            Ok(response)
        })
    }
}

/// The answer to a request that does not parse: prost's reason (which names the
/// field), and what to send instead.
fn undecodable(message: &str) -> Status {
    let reason = message
        .strip_prefix(PROST_UNDECODABLE)
        .map(|r| r.trim_start_matches(':').trim())
        .unwrap_or(message);
    Status::internal(format!(
        "the request is not a valid kinvoke.v1 message ({reason}); every string field, \
         attached file paths included, must be UTF-8: rename files whose names are not"
    ))
}

impl Settings {
    fn too_large(&self, method: &str, found: Option<u64>) -> Status {
        let got = found.map_or_else(String::new, |n| format!(" (got a {n}-byte request)"));
        if !method.starts_with("/kinvoke.v1.CommandService/") {
            // the small services (health, reflection, access) read small messages only
            return Status::resource_exhausted(format!(
                "request too large for {method}{got}: this service reads small messages only"
            ));
        }
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
