//! A small HTTP receiver that hears the gateway's break-glass announcements.

#[allow(unused_imports)]
use super::*;

// webhook receiver (where the gateway announces break-glass activity)

/// Longest request head (request line and headers) the [`WebhookReceiver`] reads.
pub(crate) const MAX_WEBHOOK_HEAD: usize = 64 * 1024;

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

/// Reads one request from `reader`: `None` at a clean end of stream (the client closed an
/// idle keep-alive connection). Bodies must come with `content-length`; chunked bodies
/// are refused, which is enough for a gateway that posts one JSON document.
pub(crate) fn read_webhook_request(reader: &mut impl BufRead) -> Result<Option<WebhookRequest>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .context("cannot read the request head")?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            bail!("the connection closed inside a request head");
        }
        if line == b"\r\n" || line == b"\n" {
            if head.is_empty() {
                // stray empty lines before a request line are allowed (RFC 9112 2.2)
                continue;
            }
            break;
        }
        head.push(String::from_utf8_lossy(&line).trim_end().to_owned());
        if head.iter().map(String::len).sum::<usize>() > MAX_WEBHOOK_HEAD {
            bail!("the request head is longer than {MAX_WEBHOOK_HEAD} bytes");
        }
    }
    let mut request_line = head[0].split_whitespace();
    let (Some(method), Some(path)) = (request_line.next(), request_line.next()) else {
        bail!("bad request line {:?}", head[0]);
    };
    let headers: Vec<(String, String)> = head[1..]
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("bad header line {h:?}"))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect::<Result<_>>()?;
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && !v.eq_ignore_ascii_case("identity"))
    {
        bail!("chunked request bodies are not supported by this test receiver");
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v
            .parse::<usize>()
            .with_context(|| format!("bad content-length {v:?}"))?,
        None => 0,
    };
    if length > MAX_WEBHOOK_BODY {
        bail!("the body ({length} bytes) is larger than {MAX_WEBHOOK_BODY} bytes");
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .context("cannot read the request body")?;
    Ok(Some(WebhookRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// Answers every request on `stream` with `200 OK` and sends it to `requests`, until the
/// client closes the connection.
pub(crate) fn serve_webhook_connection(stream: TcpStream, requests: &mpsc::Sender<WebhookRequest>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        match read_webhook_request(&mut reader) {
            Ok(Some(request)) => {
                let answered = std::io::Write::write_all(
                    &mut writer,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                );
                // a gone receiver only means the test stopped listening
                let _ = requests.send(request);
                if answered.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                eprintln!("kinvoke-tests webhook receiver: {err:#}");
                let _ = std::io::Write::write_all(
                    &mut writer,
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return;
            }
        }
    }
}

/// A tiny HTTP/1.1 server on `127.0.0.1:0` standing in for a chat or paging webhook: it
/// answers every request with `200 OK` and hands it to the test
/// ([`next_request`](Self::next_request)). Keep-alive connections are served request
/// after request.
///
/// Dropping it stops accepting, shuts down its connections and joins its threads.
#[derive(Debug)]
pub struct WebhookReceiver {
    server: LoopbackServer,
    requests: Receiver<WebhookRequest>,
}

impl WebhookReceiver {
    /// Starts the server.
    pub fn start() -> Result<Self> {
        let (tx, requests) = mpsc::channel();
        let server = LoopbackServer::start("webhook receiver", move |stream, sockets, threads| {
            if let (Ok(mut list), Ok(copy)) = (sockets.lock(), stream.try_clone()) {
                list.push(copy);
            }
            let tx = tx.clone();
            let handle = thread::Builder::new()
                .name("webhook-conn".to_owned())
                .spawn(move || serve_webhook_connection(stream, &tx))?;
            if let Ok(mut list) = threads.lock() {
                list.push(handle);
            }
            Ok(())
        })?;
        Ok(Self { server, requests })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:PORT/hook`, for `[break_glass] webhook_url` (the gateway takes
    /// plain http to a loopback address).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.server.addr)
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
