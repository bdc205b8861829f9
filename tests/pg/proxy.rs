//! [`Proxy`]: a TCP proxy on 127.0.0.1 that can stop forwarding without closing sockets (a
//! network black hole) and heal again; and [`SilentServer`], which accepts TCP and never
//! answers.
//!
//! While a connection is black-holed the proxy stops reading from both of its sockets. Bytes
//! already sent pile up in the kernels' buffers and arrive after the heal, as TCP's
//! retransmissions would deliver them after a real partition heals; nothing is dropped, so
//! the PostgreSQL protocol stream stays intact. Neither end sees a FIN or RST: exactly a
//! silent peer. A new connection accepted while everything is black-holed is not connected
//! upstream until the heal.
//!
//! The proxy reads the client's startup packet when it is plaintext, so
//! [`Proxy::connections`] shows each connection's `application_name` and a test can pick
//! "the store's connection". (After an SSLRequest the rest is encrypted: no name.)
//!
//! Threads: one accepting, two per connection (one per direction); all named `mb-proxy`.
//! Dropping the proxy shuts every socket down and joins every thread.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often a blocked thread looks at the stop and black-hole flags: the longest a heal or
/// a drop waits for a thread to notice. The proxy's own threads sleep this long between
/// looks because flags and non-blocking sockets offer nothing to block on; they stand in for
/// the network, and no test waits for the library through them.
const POLL: Duration = Duration::from_millis(5);
/// How long a proxy waits to connect upstream before giving the connection up.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The protocol code of an SSLRequest (and of a GSSENCRequest's neighbour): not a startup.
pub(super) const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// What [`Proxy::connections`] reports about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub id: u64,
    /// From the plaintext startup packet; `None` under TLS or before it arrived.
    pub application_name: Option<String>,
    pub black_holed: bool,
    /// Both ends still open.
    pub open: bool,
}

struct Conn {
    id: u64,
    application_name: Mutex<Option<String>>,
    black_holed: AtomicBool,
    closed: AtomicBool,
    /// Clones of the sockets, so the proxy can shut them down from outside the threads.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Conn {
    /// Shuts both sockets down and drops the proxy's clones of them, so a long-lived proxy
    /// (the soak's) holds no descriptor of a closed connection; the pumps drop their own as
    /// they exit.
    fn close(&self) {
        self.closed.store(true, SeqCst);
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    /// Every connection, existing and new, is black-holed.
    all_black_holed: AtomicBool,
    /// Connections accepted from now on are black-holed; those open go on working.
    new_black_holed: AtomicBool,
    /// Added before each chunk is forwarded, either way: a network's latency, in µs.
    latency_micros: AtomicU64,
    next_id: AtomicU64,
    conns: Mutex<Vec<Arc<Conn>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn holed(&self, conn: &Conn) -> bool {
        self.all_black_holed.load(SeqCst) || conn.black_holed.load(SeqCst)
    }

    fn stopping(&self, conn: &Conn) -> bool {
        self.stop.load(SeqCst) || conn.closed.load(SeqCst)
    }

    /// Waits while `conn` is black-holed; false when the proxy or the connection stops.
    fn wait_while_holed(&self, conn: &Conn) -> bool {
        while self.holed(conn) {
            if self.stopping(conn) {
                return false;
            }
            thread::sleep(POLL);
        }
        !self.stopping(conn)
    }

    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let handle = thread::Builder::new()
            .name("mb-proxy".into())
            .spawn(f)
            .expect("spawn a proxy thread");
        let mut threads = self.threads.lock().unwrap();
        // Finished ones need no join: a long-lived proxy keeps only the running.
        threads.retain(|thread| !thread.is_finished());
        threads.push(handle);
    }
}

/// A TCP proxy in front of `target`; see the module docs.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener =
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind proxy");
        // Non-blocking, polled: a blocking accept could not notice the stop flag.
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            stop: AtomicBool::new(false),
            all_black_holed: AtomicBool::new(false),
            new_black_holed: AtomicBool::new(false),
            latency_micros: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("mb-proxy accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("spawn the proxy's accept thread");
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// A proxy in front of the server `url` names (its first host and port).
    pub fn in_front_of(url: &str) -> Proxy {
        Proxy::start(super::server_addr(url))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `url` with its host and port replaced by the proxy's, in plaintext (`sslmode=disable`,
    /// a later parameter wins): the proxy names connections by the `application_name` of the
    /// startup packet, which TLS would hide.
    pub fn url(&self, url: &str) -> String {
        let url = super::with_host_port(url, "127.0.0.1", self.port());
        super::with_param(&url, "sslmode", "disable")
    }

    /// Every connection so far, oldest first, closed ones included.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.shared
            .conns
            .lock()
            .unwrap()
            .iter()
            .map(|conn| ConnInfo {
                id: conn.id,
                application_name: conn.application_name.lock().unwrap().clone(),
                black_holed: self.shared.holed(conn),
                open: !conn.closed.load(SeqCst),
            })
            .collect()
    }

    /// The ids of the open connections named `application_name`.
    pub fn open_connections(&self, application_name: &str) -> Vec<u64> {
        self.connections()
            .into_iter()
            .filter(|conn| conn.open && conn.application_name.as_deref() == Some(application_name))
            .map(|conn| conn.id)
            .collect()
    }

    /// Waits (up to 10 s) until an open connection is named `application_name`; its id.
    pub fn wait_for_connection(&self, application_name: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&id) = self.open_connections(application_name).last() {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no connection named {application_name:?} through the proxy: {:?}",
                self.connections()
            );
            // The client connects on its own thread; the proxy's list is all there is to poll.
            thread::sleep(POLL);
        }
    }

    /// Stops forwarding on connection `id`, both ways, sockets left open.
    pub fn black_hole(&self, id: u64) {
        self.conn(id).black_holed.store(true, SeqCst);
    }

    /// Black-holes every open connection named `application_name`; returns how many.
    pub fn black_hole_named(&self, application_name: &str) -> usize {
        let ids = self.open_connections(application_name);
        for &id in &ids {
            self.black_hole(id);
        }
        ids.len()
    }

    /// Forwards on connection `id` again, delivering what piled up.
    pub fn heal(&self, id: u64) {
        self.conn(id).black_holed.store(false, SeqCst);
    }

    /// Black-holes every connection, existing and new.
    pub fn black_hole_all(&self) {
        self.shared.all_black_holed.store(true, SeqCst);
    }

    /// Black-holes the connections accepted from now on; those open go on working (a
    /// PostgreSQL cancel request, which opens a connection of its own, never arrives).
    pub fn black_hole_new(&self) {
        self.shared.new_black_holed.store(true, SeqCst);
    }

    /// Undoes [`black_hole_all`](Self::black_hole_all), [`black_hole_new`](Self::black_hole_new)
    /// and every per-connection black hole.
    pub fn heal_all(&self) {
        self.shared.all_black_holed.store(false, SeqCst);
        self.shared.new_black_holed.store(false, SeqCst);
        for conn in self.shared.conns.lock().unwrap().iter() {
            conn.black_holed.store(false, SeqCst);
        }
    }

    /// The connections open now stay black-holed; new ones go through again: a path that
    /// froze while a new connection reaches a working server (a failover that moved the
    /// address away from a frozen primary).
    pub fn freeze_existing(&self) {
        for conn in self.shared.conns.lock().unwrap().iter() {
            conn.black_holed.store(true, SeqCst);
        }
        self.shared.all_black_holed.store(false, SeqCst);
    }

    /// Holds every chunk `one_way` before forwarding it, in both directions, so a round trip
    /// takes at least twice that: a network farther away than loopback.
    pub fn set_latency(&self, one_way: Duration) {
        self.shared
            .latency_micros
            .store(one_way.as_micros() as u64, SeqCst);
    }

    /// How many sockets of this process, other than the proxy's own, are connected to the
    /// proxy: the clients' end, as the kernel sees it (`/proc`, Linux). A black-holed
    /// connection is not read by the proxy, so only the client's side can tell whether the
    /// client closed it.
    pub fn client_sockets(&self) -> usize {
        self.own_tcp_sockets(|_, remote| remote == self.port())
            .len()
    }

    /// The inodes of the sockets the proxy holds on its own side of the clients'
    /// connections (the accepted ones, not the listener), for [`socket_fds`].
    pub fn accepted_socket_inodes(&self) -> Vec<String> {
        self.own_tcp_sockets(|local, remote| local == self.port() && remote != 0)
    }

    /// The inodes of this process's TCP sockets on 127.0.0.1 whose (local, remote) ports
    /// match, from `/proc/net/tcp`, which lists a socket until its connection is closed.
    fn own_tcp_sockets(&self, matches: impl Fn(u16, u16) -> bool) -> Vec<String> {
        let ours = socket_fds();
        let port = |address: &str| {
            address
                .strip_prefix("0100007F:")
                .and_then(|port| u16::from_str_radix(port, 16).ok())
        };
        std::fs::read_to_string("/proc/net/tcp")
            .expect("/proc/net/tcp")
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let ports = (port(fields.get(1)?), port(fields.get(2)?));
                let (Some(local), Some(remote)) = ports else {
                    return None;
                };
                (ours.contains(*fields.get(9)?) && matches(local, remote))
                    .then(|| fields[9].to_owned())
            })
            .collect()
    }

    /// Closes connection `id` (both sockets), as a reset would.
    pub fn close(&self, id: u64) {
        self.conn(id).close();
    }

    fn conn(&self, id: u64) -> Arc<Conn> {
        self.shared
            .conns
            .lock()
            .unwrap()
            .iter()
            .find(|conn| conn.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no proxy connection {id}"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for conn in self.shared.conns.lock().unwrap().iter() {
            conn.close();
        }
        // Threads exit within POLL of seeing the flag (their sockets are shut down too). A
        // connection thread may still spawn its second pump while we join: drain until none.
        loop {
            let threads: Vec<_> = self.shared.threads.lock().unwrap().drain(..).collect();
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let conn = Arc::new(Conn {
                    id: shared.next_id.fetch_add(1, SeqCst),
                    application_name: Mutex::new(None),
                    black_holed: AtomicBool::new(shared.new_black_holed.load(SeqCst)),
                    closed: AtomicBool::new(false),
                    sockets: Mutex::new(Vec::new()),
                });
                shared.conns.lock().unwrap().push(conn.clone());
                let conn_shared = shared.clone();
                shared.spawn(move || serve(client, conn, conn_shared));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(err) => {
                eprintln!("proxy accept failed: {err}");
                thread::sleep(POLL);
            }
        }
    }
}

/// One connection: read the startup packet, connect upstream once not black-holed, then
/// pump client → server here and server → client on a second thread.
fn serve(client: TcpStream, conn: Arc<Conn>, shared: Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(POLL));
    let _ = client.set_nodelay(true);
    if let Ok(clone) = client.try_clone() {
        conn.sockets.lock().unwrap().push(clone);
    }
    // The first bytes: the startup packet (or an SSLRequest), read without forwarding them.
    let mut first = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while first.len() < 8 || first.len() < packet_length(&first) {
        if shared.stopping(&conn) {
            return conn.close();
        }
        match (&client).read(&mut buf) {
            Ok(0) => return conn.close(),
            Ok(n) => first.extend_from_slice(&buf[..n]),
            Err(err) if is_timeout(&err) => {}
            Err(_) => return conn.close(),
        }
        if first.len() >= 8 && is_request(&first) {
            break;
        }
    }
    *conn.application_name.lock().unwrap() = startup_application_name(&first);

    if !shared.wait_while_holed(&conn) {
        return conn.close();
    }
    let Ok(server) = TcpStream::connect_timeout(&shared.target, UPSTREAM_CONNECT_TIMEOUT) else {
        return conn.close();
    };
    let _ = server.set_read_timeout(Some(POLL));
    let _ = server.set_nodelay(true);
    if let Ok(clone) = server.try_clone() {
        conn.sockets.lock().unwrap().push(clone);
    }
    if shared.stopping(&conn) {
        // Closed while we connected: make sure the new socket goes too.
        return conn.close();
    }
    if (&server).write_all(&first).is_err() {
        return conn.close();
    }
    let (Ok(server_reader), Ok(client_writer)) = (server.try_clone(), client.try_clone()) else {
        return conn.close();
    };
    let back_conn = conn.clone();
    let back_shared = shared.clone();
    shared.spawn(move || pump(server_reader, client_writer, back_conn, back_shared));
    pump(client, server, conn, shared);
}

/// Copies `from` → `to` while neither the proxy nor the connection stops; stops reading
/// while black-holed. Any end or error closes the whole connection.
fn pump(from: TcpStream, to: TcpStream, conn: Arc<Conn>, shared: Arc<Shared>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if !shared.wait_while_holed(&conn) {
            break;
        }
        match (&from).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let latency = shared.latency_micros.load(SeqCst);
                if latency > 0 {
                    // The simulated network's delay, not a wait for anything.
                    thread::sleep(Duration::from_micros(latency));
                }
                // Read just before the hole opened: hold the bytes until the heal.
                if !shared.wait_while_holed(&conn) || (&to).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(err) if is_timeout(&err) => {}
            Err(_) => break,
        }
    }
    conn.close();
}

fn is_timeout(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn packet_length(bytes: &[u8]) -> usize {
    if bytes.len() < 4 {
        return usize::MAX;
    }
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
}

/// An SSLRequest or GSSENCRequest: 8 bytes, answered before any startup packet.
fn is_request(bytes: &[u8]) -> bool {
    let code = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    packet_length(bytes) == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE)
}

/// `application_name` from a plaintext startup packet: length, protocol 3.0, then
/// NUL-terminated key and value pairs.
fn startup_application_name(packet: &[u8]) -> Option<String> {
    if packet.len() < 8 || is_request(packet) {
        return None;
    }
    let end = packet_length(packet).min(packet.len());
    let mut fields = packet[8..end].split(|&b| b == 0);
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        if key == b"application_name" {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        if key.is_empty() {
            break;
        }
    }
    None
}

/// A TCP server on a free port of 127.0.0.1 that accepts connections and never sends a
/// byte: a server that is up as far as TCP knows, and silent. Drop closes it all.
pub struct SilentServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl SilentServer {
    pub fn start() -> SilentServer {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_accepted) = (stop.clone(), accepted.clone());
        let accept = thread::Builder::new()
            .name("mb-silent-server".into())
            .spawn(move || {
                // Held, never read or written, until the server is dropped.
                let mut held = Vec::new();
                while !thread_stop.load(SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            thread_accepted.fetch_add(1, SeqCst);
                            held.push(stream);
                        }
                        // Polled so the thread notices the stop flag.
                        Err(_) => thread::sleep(POLL),
                    }
                }
            })
            .expect("spawn the silent server");
        SilentServer {
            addr,
            stop,
            accepted,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.addr.port()
        )
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(SeqCst)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// The inodes of every socket this process has a descriptor of (`/proc/self/fd`), closed
/// connections whose descriptor is still held included.
pub fn socket_fds() -> std::collections::HashSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect()
}
