//! The gateway's global cap on RPCs being handled at once (`limits.max_in_flight_requests`),
//! all callers together. A request over the cap is refused at once with
//! `RESOURCE_EXHAUSTED` and a retry hint rather than queued, so a flood costs the gateway
//! a refusal, not memory; it is audited as `request_refused`. A request counts until its
//! handler answers: a unary call (an invoke that waits included) until its result, a
//! streaming call until the stream starts. Health checks are never refused, so an
//! orchestrator does not restart a gateway for being busy. It also names each request's
//! method in its extensions ([`RpcMethod`]) for the audit events of later stages.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::audit::{Audit, AuditEvent};
use crate::connection::{ConnInfo, RpcMethod};
use crate::status::retry_later;

/// The retry hint of a refusal: in-flight calls end at their own pace.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Paths never counted or refused.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// A tower layer over the gRPC routes that caps the requests in flight.
#[derive(Clone)]
pub struct InFlightLimit {
    slots: Arc<Semaphore>,
    limit: usize,
    audit: Audit,
}

impl InFlightLimit {
    /// At most `limit` requests handled at once; refusals audited to `audit`.
    pub fn new(limit: usize, audit: Audit) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            audit,
        }
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
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
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
            self.limit.audit.record(AuditEvent::RequestRefused {
                listener: conn.map(|c| c.listener.to_string()).unwrap_or_default(),
                source: conn.map(|c| c.source.to_string()).unwrap_or_default(),
                principal: None,
                method: req.uri().path().to_owned(),
                code: format!("{:?}", status.code()),
                reason: status.message().to_owned(),
            });
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
