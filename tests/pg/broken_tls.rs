//! [`BrokenTls`]: a fake PostgreSQL front end on 127.0.0.1 whose TLS never works and whose
//! plaintext does, the server libpq's `sslmode=prefer` must fall back from.
//!
//! A connection that opens with an SSLRequest gets the [`Breakage`] the test chose: an `S`
//! (TLS accepted) and then bytes that are no TLS record, or an `S` and the end of the
//! stream, or no answer at all. A connection that opens with anything else (a plaintext
//! startup, a cancel request) is forwarded byte for byte to a real server. So a client that
//! tries TLS first fails that attempt, and a second, plaintext attempt gets a real session.
//! [`BrokenTls::ssl_requests`] and [`BrokenTls::plaintext`] count both kinds, so a test can
//! tell a fallback from a client that never tried TLS.
//!
//! Threads: one accepting, one per connection, a second per forwarded connection; all named
//! `mb-broken-tls`. Dropping it closes the listener first (a client falling back as the
//! test ends is refused, not served), then shuts every socket down and joins every thread.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::proxy::SSL_REQUEST_CODE;

/// What a TLS attempt gets after its SSLRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakage {
    /// `S`, then an HTTP error page, as from another service on the port: no TLS record.
    Garbage,
    /// `S`, then the end of the stream.
    Close,
    /// Nothing: the connection stays open and silent, a black hole.
    Silence,
}

/// What [`Breakage::Garbage`] sends instead of a ServerHello.
const NOT_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
/// How long a forwarded connection waits to connect to the real server.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    target: SocketAddr,
    breakage: Breakage,
    stop: AtomicBool,
    ssl_requests: AtomicU64,
    plaintext: AtomicU64,
    /// Clones of every socket, so that drop can shut them down and end blocked threads.
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Keeps a clone of `socket` for drop; shuts it down at once if drop already ran.
    fn hold(&self, socket: &TcpStream) -> io::Result<()> {
        let mut sockets = self.sockets.lock().unwrap();
        if self.stop.load(SeqCst) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        sockets.push(socket.try_clone()?);
        Ok(())
    }
}

/// A front end in front of `target`; see the module docs.
pub struct BrokenTls {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl BrokenTls {
    /// Listens on a free port of 127.0.0.1, breaks TLS attempts as `breakage` says and
    /// forwards everything else to `target`.
    pub fn start(breakage: Breakage, target: SocketAddr) -> BrokenTls {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind the front end");
        let addr = listener.local_addr().expect("front-end address");
        let shared = Arc::new(Shared {
            target,
            breakage,
            stop: AtomicBool::new(false),
            ssl_requests: AtomicU64::new(0),
            plaintext: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("mb-broken-tls accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("spawn the front end's accept thread");
        BrokenTls {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// A front end in front of the server `url` names (its first host and port).
    pub fn in_front_of(url: &str, breakage: Breakage) -> BrokenTls {
        BrokenTls::start(breakage, super::server_addr(url))
    }

    /// `url` pointed at this front end, with `sslmode`.
    pub fn url(&self, url: &str, sslmode: &str) -> String {
        let url = super::with_host_port(url, "127.0.0.1", self.addr.port());
        super::with_param(&url, "sslmode", sslmode)
    }

    /// How many connections opened with an SSLRequest (and were broken).
    pub fn ssl_requests(&self) -> u64 {
        self.shared.ssl_requests.load(SeqCst)
    }

    /// How many connections opened in plaintext (and were forwarded).
    pub fn plaintext(&self) -> u64 {
        self.shared.plaintext.load(SeqCst)
    }
}

impl Drop for BrokenTls {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        // Wakes the blocking accept; the accept thread sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for socket in self.shared.sockets.lock().unwrap().iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        // Every connection thread was started by the accept thread, which has ended; each
        // joins the second half of its forwarding itself.
        let threads: Vec<_> = self.shared.threads.lock().unwrap().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.hold(&client).is_err() {
            continue;
        }
        let conn_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("mb-broken-tls".into())
            .spawn(move || {
                // An error ends the connection too. The held clone would keep the socket
                // open: shut it down, so the client sees its stream end.
                let _ = serve(&client, &conn_shared);
                let _ = client.shutdown(Shutdown::Both);
            })
            .expect("spawn a front-end thread");
        shared.threads.lock().unwrap().push(handle);
    }
}

/// One connection: its first 8 bytes say whether it is a TLS attempt.
fn serve(client: &TcpStream, shared: &Shared) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let mut first = [0u8; 8];
    (&*client).read_exact(&mut first)?;
    let is_ssl_request =
        first[..4] == 8u32.to_be_bytes() && first[4..] == SSL_REQUEST_CODE.to_be_bytes();
    if !is_ssl_request {
        shared.plaintext.fetch_add(1, SeqCst);
        return forward(client, &first, shared);
    }
    shared.ssl_requests.fetch_add(1, SeqCst);
    match shared.breakage {
        Breakage::Garbage => {
            (&*client).write_all(b"S")?;
            (&*client).write_all(NOT_TLS)?;
        }
        Breakage::Close => {
            (&*client).write_all(b"S")?;
            client.shutdown(Shutdown::Write)?;
        }
        Breakage::Silence => {}
    }
    // Reads what the client sends (its ClientHello) until it closes: closing with unread
    // bytes would send a reset, and the client could see that instead of what was sent.
    io::copy(&mut &*client, &mut io::sink())?;
    Ok(())
}

/// Connects to the target, sends it `first`, then copies both ways until either side ends.
fn forward(client: &TcpStream, first: &[u8], shared: &Shared) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&shared.target, UPSTREAM_CONNECT_TIMEOUT)?;
    shared.hold(&server)?;
    let _ = server.set_nodelay(true);
    let forwarded = (&server).write_all(first).and_then(|()| {
        let (server_reader, client_writer) = (server.try_clone()?, client.try_clone()?);
        let back = thread::Builder::new()
            .name("mb-broken-tls".into())
            .spawn(move || copy_until_end(&server_reader, &client_writer))?;
        copy_until_end(client, &server);
        let _ = back.join();
        Ok(())
    });
    let _ = server.shutdown(Shutdown::Both);
    forwarded
}

/// Copies `from` to `to`; when either ends, shuts both down so the other direction ends too.
fn copy_until_end(from: &TcpStream, to: &TcpStream) {
    let _ = io::copy(&mut &*from, &mut &*to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
