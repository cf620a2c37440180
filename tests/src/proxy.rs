//! A load balancer stand-in that sends a PROXY protocol header before relaying a TCP connection.

#[allow(unused_imports)]
use super::*;

// TCP relay (a load balancer in front of the gateway)

/// A PROXY protocol v1 header for a TCP connection from `source` to `destination`;
/// both must be of the same IP family.
pub fn proxy_v1_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A TCP relay on `127.0.0.1:0`, standing in for a load balancer: for every accepted
/// connection it connects to the upstream, writes a fixed preamble (a PROXY protocol
/// header, say) and then copies bytes both ways until each side has closed.
///
/// Dropping it stops accepting, shuts down every relayed connection and joins its
/// threads.
#[derive(Debug)]
pub struct TcpRelay {
    server: LoopbackServer,
}

impl TcpRelay {
    /// Starts relaying to `upstream`, writing `preamble` first on every upstream
    /// connection.
    pub fn start(upstream: SocketAddr, preamble: Vec<u8>) -> Result<Self> {
        let server = LoopbackServer::start("relay", move |client, sockets, threads| {
            relay_one(client, upstream, &preamble, sockets, threads)
        })?;
        Ok(Self { server })
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `https://127.0.0.1:PORT` of the relay (the gateway's certificate covers 127.0.0.1).
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.server.addr)
    }
}

/// Connects `client` to `upstream` through two copying threads.
pub(crate) fn relay_one(
    client: TcpStream,
    upstream: SocketAddr,
    preamble: &[u8],
    sockets: &Mutex<Vec<TcpStream>>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) -> Result<()> {
    let mut server = TcpStream::connect(upstream)
        .with_context(|| format!("cannot connect to the upstream {upstream}"))?;
    std::io::Write::write_all(&mut server, preamble).context("cannot send the preamble")?;
    let pump = |from: TcpStream, to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut &from, &mut &to);
            // pass the end of stream on, so the other side sees it too
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let up = thread::Builder::new()
        .name("relay-up".to_owned())
        .spawn(pump(client.try_clone()?, server.try_clone()?))?;
    let down = thread::Builder::new()
        .name("relay-down".to_owned())
        .spawn(pump(server.try_clone()?, client.try_clone()?))?;
    if let Ok(mut list) = threads.lock() {
        list.extend([up, down]);
    }
    if let Ok(mut list) = sockets.lock() {
        list.extend([client, server]);
    }
    Ok(())
}

/// A thread-per-connection TCP server on 127.0.0.1:0 for test doubles (the PROXY relay,
/// the webhook receiver). Dropping it stops accepting, shuts every connection down and
/// joins every thread.
#[derive(Debug)]
pub(crate) struct LoopbackServer {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

/// What a [`LoopbackServer`] does with each connection: it may register sockets to shut
/// down and threads to join at drop.
pub(crate) type OnConnection = dyn Fn(TcpStream, &Mutex<Vec<TcpStream>>, &Mutex<Vec<JoinHandle<()>>>) -> Result<()>
    + Send
    + 'static;

impl LoopbackServer {
    pub(crate) fn start(
        name: &str,
        on_connection: impl Fn(
            TcpStream,
            &Mutex<Vec<TcpStream>>,
            &Mutex<Vec<JoinHandle<()>>>,
        ) -> Result<()>
        + Send
        + 'static,
    ) -> Result<Self> {
        let on_connection: Box<OnConnection> = Box::new(on_connection);
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .with_context(|| format!("cannot bind the {name}"))?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("cannot read the {name}'s address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let label = name.to_owned();
        let accept = {
            let (stop, sockets, threads) = (stop.clone(), sockets.clone(), threads.clone());
            thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        // a failed accept or connection drops that client only
                        let Ok(stream) = stream else { continue };
                        if let Err(err) = on_connection(stream, &sockets, &threads) {
                            eprintln!("kinvoke-tests {label}: {err:#}");
                        }
                    }
                })
                .with_context(|| format!("cannot start the {name}'s accept thread"))?
        };
        Ok(Self {
            addr,
            stop,
            sockets,
            threads,
            accept: Some(accept),
        })
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the blocked accept so it sees the flag
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Ok(sockets) = self.sockets.lock() {
            for socket in sockets.iter() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        let threads = self
            .threads
            .lock()
            .map(|mut list| std::mem::take(&mut *list))
            .unwrap_or_default();
        for thread in threads {
            let _ = thread.join();
        }
    }
}
