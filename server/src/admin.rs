//! The admin listener (`[admin] address`): plain HTTP on its own address, off the gRPC
//! port, for the platform around the gateway rather than its callers. Put it where only
//! the platform reaches (loopback, the Pod network behind a NetworkPolicy); it serves no
//! secrets and changes nothing.
//!
//! - `GET /metrics`: the Prometheus metrics (`crate::metrics`) in the OpenMetrics text
//!   format.
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 when the gateway takes commands; 503 naming why not while the
//!   audit log cannot be written, the result store cannot be reached, or shutdown has
//!   begun (readiness: a load balancer stops sending callers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `[admin]`: where the admin listener listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address; port 0 picks a free one.
    pub address: SocketAddr,
}

/// Why the gateway is not ready; `None` = ready.
pub type Readiness = Option<String>;

/// Longest a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest one connection may stay open, whatever it does (one that never reads its
/// answer included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(15);

/// Connections served at once; more wait in the kernel's backlog. Scrapers and probes
/// need a handful.
const MAX_CONNECTIONS: usize = 32;

/// Binds the admin listener.
pub async fn bind(config: &AdminConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.address).await
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    ready: watch::Receiver<Readiness>,
    stop: CancellationToken,
) {
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // a place first: past the cap, connections wait in the backlog, unread
        let place = tokio::select! {
            place = places.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // out of file descriptors, say: wait rather than spin
                tracing::warn!(%err, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ready = ready.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req| {
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(answer(&req, &ready)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn answer(req: &Request<Incoming>, ready: &watch::Receiver<Readiness>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match ready.borrow().as_ref() {
            None => text(StatusCode::OK, "ready\n".to_owned()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => match crate::metrics::metrics().encode() {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the metrics: {err}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this listener serves /metrics, /healthz and /readyz\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
