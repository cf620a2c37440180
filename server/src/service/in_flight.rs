//! The gateway's global cap on RPCs being handled at once (`limits.max_in_flight_requests`),
//! all callers together. A request over the cap is refused at once with
//! `RESOURCE_EXHAUSTED` and a retry hint rather than queued, so a flood costs the gateway
//! a refusal, not memory; it is audited as `request_refused`. A request counts until its
//! handler answers: a unary call (an invoke that waits included) until its result, a
//! streaming call until the stream starts. Health checks are never refused, so an
//! orchestrator does not restart a gateway for being busy. Every request, health checks
//! included, must arrive whole within `limits.request_read_timeout` ([`DeadlineBody`]),
//! so a client that starts requests and never finishes them holds neither a place nor
//! memory. The layer also names each request's method in its extensions ([`RpcMethod`])
//! for the audit events of later stages.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::audit::{Audit, AuditEvent, Throttle, clip};
use crate::connection::{ConnInfo, RpcMethod};
use crate::status::retry_later;

/// The retry hint of a refusal: in-flight calls end at their own pace.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Longest method path an audit line carries, in bytes (a caller chooses it).
pub const MAX_AUDITED_METHOD: usize = 256;

/// Paths never counted or refused.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// A tower layer over the gRPC routes that caps the requests in flight.
#[derive(Clone)]
pub struct InFlightLimit {
    slots: Arc<Semaphore>,
    limit: usize,
    read_timeout: Duration,
    audit: Audit,
    throttle: Arc<Throttle<String>>,
}

impl InFlightLimit {
    /// At most `limit` requests handled at once, each given `read_timeout` to arrive
    /// whole (so a request that never finishes cannot hold its place, or its buffered
    /// bytes, for ever); refusals audited to `audit`, at most as often per source as
    /// `throttle` allows.
    pub fn new(
        limit: usize,
        read_timeout: Duration,
        audit: Audit,
        throttle: Arc<Throttle<String>>,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            read_timeout,
            audit,
            throttle,
        }
    }
}

/// A request body that must end within a deadline: past it, reading fails with
/// `DEADLINE_EXCEEDED` naming `limits.request_read_timeout`.
pub struct DeadlineBody<B> {
    inner: Pin<Box<B>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    ended: bool,
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if !this.ended && this.deadline.as_mut().poll(cx).is_ready() {
            this.ended = true;
            // a Status, which tonic answers as it is
            let status = tonic::Status::deadline_exceeded(format!(
                "the request did not arrive whole within {} (limits.request_read_timeout)",
                humantime::format_duration(this.timeout)
            ));
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S> tower::Layer<S> for InFlightLimit {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            limit: self.clone(),
        }
    }
}

/// The service [`InFlightLimit`] wraps around the routes.
#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    limit: InFlightLimit,
}

impl<S, B, R> tower::Service<http::Request<B>> for InFlightService<S>
where
    S: tower::Service<http::Request<DeadlineBody<B>>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = RpcMethod(req.uri().path().into());
        req.extensions_mut().insert(method);
        let timeout = self.limit.read_timeout;
        let req = req.map(|body| DeadlineBody {
            inner: Box::pin(body),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            ended: false,
        });
        if req.uri().path().starts_with(EXEMPT_PREFIX) {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = self.limit.slots.clone().try_acquire_owned() else {
            let status = retry_later(
                format!(
                    "the gateway is handling as many requests as it may at once \
                     (limits.max_in_flight_requests = {}); retry in 1s",
                    self.limit.limit
                ),
                RETRY_AFTER,
            );
            let conn = req.extensions().get::<ConnInfo>();
            let source_ip = conn.map(|c| c.source.ip().to_string()).unwrap_or_default();
            self.limit.audit.record_throttled(
                &self.limit.throttle,
                &source_ip,
                |unrecorded_before| AuditEvent::RequestRefused {
                    listener: conn.map(|c| c.listener.to_string()).unwrap_or_default(),
                    source: conn.map(|c| c.source.to_string()).unwrap_or_default(),
                    principal: None,
                    method: clip(req.uri().path(), MAX_AUDITED_METHOD),
                    code: format!("{:?}", status.code()),
                    reason: status.message().to_owned(),
                    unrecorded_before,
                },
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}
