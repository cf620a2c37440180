//! A small HTTP receiver that hears the gateway's break-glass announcements.

#[allow(unused_imports)]
use super::*;

// webhook receiver (where the gateway announces break-glass activity)

/// Largest request body the [`WebhookReceiver`] reads.
pub(crate) const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// One HTTP request a [`WebhookReceiver`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target, e.g. `/hook`.
    pub path: String,
    /// Header names (lowercased) and values, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8).
    pub body: String,
}

impl WebhookRequest {
    /// The first value of a header (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Parses the body as one JSON document.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the webhook body is not JSON: {:?}", self.body))
    }
}

/// A hyper HTTP/1.1 server on `127.0.0.1:0` standing in for a chat or paging webhook,
/// on a runtime of its own: it answers every request with `200 OK` (bodies over
/// [`MAX_WEBHOOK_BODY`] with 413) and hands it to the test
/// ([`next_request`](Self::next_request)). Keep-alive connections are served request
/// after request.
///
/// Dropping it stops the server and joins its thread.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    requests: Receiver<WebhookRequest>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    /// Starts the server.
    pub fn start() -> Result<Self> {
        Self::answering(String::new())
    }

    /// Starts a server that answers every request with `200 OK` and this JSON body:
    /// a stand-in for an HTTP API such as a CI system's token endpoint.
    pub fn answering(body: String) -> Result<Self> {
        let listener =
            TcpListener::bind(("127.0.0.1", 0)).context("cannot bind the webhook receiver")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, requests) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the webhook receiver's runtime")?;
        let thread = thread::Builder::new()
            .name("webhook-receiver".to_owned())
            .spawn(move || runtime.block_on(serve_webhooks(listener, tx, stopped, body)))?;
        Ok(Self {
            addr,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/hook`, for `[break_glass] webhook_url` (the gateway takes
    /// plain http to a loopback address).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The next request received, waiting for it at most `timeout` (a guard against
    /// hangs, not an expectation).
    pub fn next_request(&self, timeout: Duration) -> Result<WebhookRequest> {
        self.requests
            .recv_timeout(timeout)
            .map_err(|err| match err {
                RecvTimeoutError::Timeout => {
                    anyhow!("the webhook received no request within {timeout:?}")
                }
                RecvTimeoutError::Disconnected => anyhow!("the webhook receiver stopped"),
            })
    }

    /// The requests received and not yet taken, without waiting.
    pub fn received_so_far(&self) -> Vec<WebhookRequest> {
        self.requests.try_iter().collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stopped`, each served by hyper in a task of its own.
async fn serve_webhooks(
    listener: TcpListener,
    requests: mpsc::Sender<WebhookRequest>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    body: String,
) {
    let body = bytes::Bytes::from(body);
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        eprintln!("kinvoke-tests webhook receiver: cannot use its listener");
        return;
    };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    eprintln!("kinvoke-tests webhook receiver: accept failed: {err}");
                    continue;
                }
            },
        };
        let requests = requests.clone();
        let body = body.clone();
        let service = hyper::service::service_fn(move |req| {
            let requests = requests.clone();
            let body = body.clone();
            async move { Ok::<_, std::convert::Infallible>(receive(req, &requests, body).await) }
        });
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                eprintln!("kinvoke-tests webhook receiver: {err}");
            }
        });
    }
    connections.abort_all();
}

/// Reads one request whole, hands it to the test and answers 200 with `answer` (413
/// when too big).
async fn receive(
    req: hyper::Request<hyper::body::Incoming>,
    requests: &mpsc::Sender<WebhookRequest>,
    answer: bytes::Bytes,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let status = match http_body_util::Limited::new(body, MAX_WEBHOOK_BODY)
        .collect()
        .await
    {
        Ok(collected) => {
            let request = WebhookRequest {
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".to_owned()),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            };
            // a gone receiver only means the test stopped listening
            let _ = requests.send(request);
            hyper::StatusCode::OK
        }
        Err(_) => hyper::StatusCode::PAYLOAD_TOO_LARGE,
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(answer));
    *response.status_mut() = status;
    response
}

/// A loopback port nothing listens on: bound to learn a free port, then released, so a
/// connection to it is refused (unless another process takes it in between, which a
/// test on a quiet machine need not fear).
pub fn closed_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot bind a loopback port")?;
    Ok(listener
        .local_addr()
        .context("cannot read the bound port")?
        .port())
}
