//! [`DelayProxy`]: a TCP proxy on 127.0.0.1 that delivers every chunk a fixed time after it
//! arrived, in each direction: a network one hop away, for measurements on one machine.
//!
//! A round trip through it costs at least twice the one-way delay on top of the path behind
//! it, and a little more: a sleeping thread wakes late (timer slack, a busy CPU), by 0.2-0.3
//! ms per direction on a busy 2-core machine. `loadgen --rtt-ms X` starts one with X/2 each
//! way, times `SELECT 1` through it, shortens the delay by the excess
//! ([`DelayProxy::set_one_way`]) and prints what `SELECT 1` then really takes. Throughput is not limited by the delay: per connection and direction,
//! one thread reads and stamps each chunk with its due time and queues it, and another
//! writes it when it is due. A reader never waits for a write, so chunks that arrive back to
//! back leave back to back, in order, each `one_way` later, as they would over a long link.
//! The queue holds at most [`QUEUE_CHUNKS`] chunks; past that the reader stops reading and
//! TCP's own flow control pushes back on the sender, as a full link's window would.
//!
//! It listens on 127.0.0.1 only and connects only to the target it was given. Threads: one
//! accepting, four per connection (a reader and a writer each way), named `delay-proxy`;
//! every loop ends when the proxy is dropped, when either end closes, or on any socket
//! error, and each blocking call wakes at least every [`POLL`] to check. Dropping the proxy
//! shuts every socket down and joins every thread; a process that exits without dropping it
//! takes the threads with it.
//!
//! Shared by `examples/loadgen.rs` and the benches: include it with
//! `#[path = "../examples/support/delay_proxy.rs"] mod delay_proxy;` (the path is relative
//! to the including file). It needs only `std`.

#![allow(dead_code)] // each includer uses a different part

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The longest any of the proxy's threads blocks before it looks at the stop flag again,
/// and so the longest a drop waits for a thread to notice.
pub const POLL: Duration = Duration::from_millis(20);
/// Chunks queued per connection and direction before the reader stops reading. At 64 KiB a
/// chunk that is 64 MiB, far more than one delay's worth of anything PostgreSQL sends here.
pub const QUEUE_CHUNKS: usize = 1024;
/// How long a new connection may take to reach the target before it is given up.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK_BYTES: usize = 64 * 1024;

/// A delaying proxy in front of one target; see the module docs.
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    /// The delay each chunk gets, in µs; read as each chunk arrives, so a change applies
    /// from the next chunk on.
    one_way_micros: AtomicU64,
    stop: AtomicBool,
    /// Clones of every socket, so a drop can shut them down from outside their threads.
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn due(&self) -> Instant {
        Instant::now() + Duration::from_micros(self.one_way_micros.load(SeqCst))
    }

    fn spawn(&self, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let handle = thread::Builder::new().name("delay-proxy".into()).spawn(f)?;
        lock(&self.threads).push(handle);
        Ok(())
    }

    fn keep(&self, socket: &TcpStream) -> io::Result<()> {
        lock(&self.sockets).push(socket.try_clone()?);
        Ok(())
    }
}

impl DelayProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`, each
    /// chunk `one_way` after it arrived, both ways. `target` must be a loopback address:
    /// the proxy is for measurements on this machine, never a relay to elsewhere.
    pub fn start(target: SocketAddr, one_way: Duration) -> io::Result<DelayProxy> {
        if !target.ip().is_loopback() {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("the delay proxy only forwards to this machine; {target} is not a loopback address"),
            ));
        }
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        // Polled: a blocking accept could not notice the stop flag.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            one_way_micros: AtomicU64::new(one_way.as_micros() as u64),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("delay-proxy accept".into())
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(DelayProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Where clients connect: 127.0.0.1 and the proxy's port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The delay added to each chunk in each direction.
    pub fn one_way(&self) -> Duration {
        Duration::from_micros(self.shared.one_way_micros.load(SeqCst))
    }

    /// Changes the delay, from the next chunk on. A sleeping thread wakes a little late
    /// (timer slack, a busy CPU), so a measured round trip comes out above twice the
    /// delay: a caller that wants a given round trip measures it and sets a shorter delay.
    pub fn set_one_way(&self, one_way: Duration) {
        self.shared
            .one_way_micros
            .store(one_way.as_micros() as u64, SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for socket in lock(&self.shared.sockets).iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        // A connection thread may still be starting its others while we join: take the list
        // until it stays empty. Each round joins threads that end within POLL, and no new
        // connection starts once the accept thread has ended, so this ends.
        loop {
            let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

/// A poisoned lock only means another proxy thread panicked; the list is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let conn_shared = shared.clone();
                if let Err(err) = shared.spawn(move || connect(client, conn_shared)) {
                    eprintln!("delay proxy: cannot start a connection thread: {err}");
                }
            }
            // Nothing to accept (or a transient error): look at the stop flag again soon.
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// One connection: reach the target, then start a reader and a writer each way.
fn connect(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, UPSTREAM_CONNECT_TIMEOUT) else {
        return;
    };
    let setup = || -> io::Result<()> {
        for socket in [&client, &server] {
            socket.set_nonblocking(false)?;
            // Without it Nagle's algorithm would hold small messages back on top of the delay.
            socket.set_nodelay(true)?;
            socket.set_read_timeout(Some(POLL))?;
            shared.keep(socket)?;
        }
        if shared.stop.load(SeqCst) {
            // Dropped while we connected: the drop may have missed these sockets.
            return Err(ErrorKind::Interrupted.into());
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (tx, rx) = mpsc::sync_channel(QUEUE_CHUNKS);
            let (from, to) = (from.try_clone()?, to.try_clone()?);
            let (read_shared, write_shared) = (shared.clone(), shared.clone());
            shared.spawn(move || read_side(from, tx, read_shared))?;
            shared.spawn(move || write_side(rx, to, write_shared))?;
        }
        Ok(())
    };
    if setup().is_err() {
        for socket in [&client, &server] {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// What the reader hands the writer: bytes due at an instant, or the end of the stream.
enum Chunk {
    Data(Instant, Vec<u8>),
    End(Instant),
}

/// Reads chunks as fast as they come and queues each with its due time.
fn read_side(from: TcpStream, queue: SyncSender<Chunk>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    while !shared.stop.load(SeqCst) {
        let chunk = match (&from).read(&mut buf) {
            Ok(0) => Chunk::End(shared.due()),
            Ok(n) => Chunk::Data(shared.due(), buf[..n].to_vec()),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let end = matches!(chunk, Chunk::End(_));
        if !send(&queue, chunk, &shared) || end {
            return;
        }
    }
    // An error or the stop: the writer sees the queue close and closes its side at once.
}

/// Queues `chunk`, waiting while the queue is full (the writer is a delay behind); false
/// when the writer is gone or the proxy stops.
fn send(queue: &SyncSender<Chunk>, mut chunk: Chunk, shared: &Shared) -> bool {
    loop {
        match queue.try_send(chunk) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => {
                if shared.stop.load(SeqCst) {
                    return false;
                }
                chunk = back;
                // A full queue holds QUEUE_CHUNKS chunks of the delay: the writer frees one
                // soon; a short wait keeps this a flow-control pause, not a spin.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Writes each queued chunk when it is due; at the end of the stream, half-closes the other
/// side so the peer sees the close a delay later too.
fn write_side(queue: mpsc::Receiver<Chunk>, to: TcpStream, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        let chunk = match queue.recv_timeout(POLL) {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let due = match &chunk {
            Chunk::Data(due, _) | Chunk::End(due) => *due,
        };
        // The simulated link's delay: the reader has already moved on to the next chunk.
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        match chunk {
            Chunk::Data(_, bytes) => {
                if (&to).write_all(&bytes).is_err() {
                    break;
                }
            }
            Chunk::End(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
    // A failed write or a reader that gave up: the connection is broken both ways.
    let _ = to.shutdown(Shutdown::Both);
}
