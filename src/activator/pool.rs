//! Keep-alive HTTP/1.1 connections to replicas: a small stack of idle connections per
//! replica (so there is no pool-wide lock), checked out per request and checked back in
//! when its response has been read to the end.
//!
//! With one data-plane thread per core (`workers`), each replica keeps one stack per
//! thread: a connection's driving task runs on the thread that opened it, so a request
//! takes its thread's own connections (no cross-thread wake-ups per request) and gives
//! each back to the stack of the thread it belongs to. Only a request that would
//! otherwise wait for a connect slot borrows another thread's idle connection.
//!
//! Two kinds of connection are pooled, each in its own [`IdleConns`]: hyper's ([`Conn`],
//! for the requests `proxy` serves) and plain sockets ([`RawConn`], for the HTTP/1.1
//! exchanges `lane` writes and reads itself). The hyper kind is written on hyper's
//! connection API rather than hyper-util's legacy `Client` because the proxy needs what
//! that client hides: whether a failure happened before the request was written (then it
//! is retried, on another replica for a connect failure), and no extra task per request
//! to return a connection to the pool.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::proxy::UpstreamBody;

/// Idle connections kept per replica at most.
const MAX_IDLE_PER_REPLICA: usize = 512;
/// Connections being opened to one replica at once. A burst (the queue of a cold start
/// released at once) then reuses connections as responses complete instead of
/// overflowing a fresh replica's accept backlog (Python's http.server listens with 5).
const MAX_CONNECTING_PER_REPLICA: usize = 8;

thread_local! {
    /// The data-plane thread this is (see `workers`); 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as data-plane thread `index`.
pub(crate) fn set_worker(index: usize) {
    WORKER.set(index);
}

/// An HTTP/1.1 connection to a replica, ready for a request.
pub(crate) struct Conn {
    send: SendRequest<UpstreamBody>,
    /// The thread whose runtime drives it.
    home: usize,
}

impl Conn {
    pub(crate) fn try_send_request(
        &mut self,
        req: http::Request<UpstreamBody>,
    ) -> impl Future<
        Output = Result<
            http::Response<hyper::body::Incoming>,
            hyper::client::conn::TrySendError<http::Request<UpstreamBody>>,
        >,
    > + use<> {
        self.send.try_send_request(req)
    }
}

/// A pooled connection, as the pool sees it.
pub(crate) trait Pooled {
    /// The data-plane thread whose stack it goes back to.
    fn home(&self) -> usize;
    /// It can never take a request again.
    fn is_closed(&self) -> bool;
    /// It can take a request now (not still finishing its last exchange).
    fn is_ready(&self) -> bool;
}

impl Pooled for Conn {
    fn home(&self) -> usize {
        self.home
    }

    fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    fn is_ready(&self) -> bool {
        self.send.is_ready()
    }
}

/// A plain keep-alive socket to a replica, between two HTTP/1.1 exchanges (`lane`).
pub(crate) struct RawConn {
    pub(crate) stream: TcpStream,
    home: usize,
}

impl RawConn {
    /// Opens one from this thread.
    pub(crate) async fn open(addr: SocketAddr, timeout: Duration) -> Result<Self, ConnectError> {
        Ok(Self {
            stream: connect_tcp(addr, timeout).await?,
            home: WORKER.get(),
        })
    }
}

impl Pooled for RawConn {
    fn home(&self) -> usize {
        self.home
    }

    /// An idle socket is readable only when the replica closed it (or broke the
    /// protocol by sending unasked bytes). The event loop's readiness answers without a
    /// system call when nothing arrived; only a socket flagged readable is read.
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                !matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Why a replica could not be reached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl ConnectError {
    /// Nothing listens at the address (yet): the connect was refused.
    pub(crate) fn is_refused(&self) -> bool {
        matches!(self, ConnectError::Tcp { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// Idle connections with when each came back, newest last.
type Stack<C> = Mutex<Vec<(C, Instant)>>;

/// The idle connections of one replica, one stack per data-plane thread.
pub(crate) struct IdleConns<C = Conn> {
    stacks: Box<[Stack<C>]>,
    /// Idle connections kept per stack at most.
    max_idle: usize,
    connecting: AtomicUsize,
    /// Requests waiting in [`Self::acquire`] for a connection to come back.
    waiting: AtomicUsize,
    /// A connection was checked in, or a connect finished (notified only when someone
    /// waits: the common checkout and checkin touch no waiter list).
    changed: Notify,
}

impl<C> std::fmt::Debug for IdleConns<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self
            .stacks
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum();
        f.debug_struct("IdleConns").field("idle", &n).finish()
    }
}

impl IdleConns<Conn> {
    /// A connection for one request: an idle one, a new one, or, while the most
    /// connects are under way, the first one to come back. `true` when it was pooled.
    pub(crate) async fn acquire(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<(Conn, bool), ConnectError> {
        let here = WORKER.get();
        self.acquire_with(|| async move {
            connect(addr, connect_timeout)
                .await
                .map(|send| Conn { send, home: here })
        })
        .await
    }
}

impl<C> IdleConns<C> {
    fn wake_one(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_one();
        }
    }
}

impl<C: Pooled> IdleConns<C> {
    /// Idle connections for `threads` data-plane threads (at least one stack).
    pub(crate) fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        Self {
            stacks: (0..threads).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle: (MAX_IDLE_PER_REPLICA / threads).max(1),
            connecting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn stack(&self, thread: usize) -> &Stack<C> {
        &self.stacks[thread % self.stacks.len()]
    }

    /// A connection for one request: an idle one, one `open` makes, or, while the most
    /// connects are under way, the first one to come back. `true` when it was pooled.
    pub(crate) async fn acquire_with<F, Fut>(&self, open: F) -> Result<(C, bool), ConnectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, ConnectError>>,
    {
        let here = WORKER.get();
        let mut open = Some(open);
        if let Some(conn) = self.checkout(here) {
            return Ok((conn, true));
        }
        loop {
            // The slot is given back however the connect ends, also when the request
            // stops waiting for it (its timeout, its client gone) and drops it midway.
            let slot = Connecting::enter(self);
            if slot.granted
                && let Some(open) = open.take()
            {
                let result = open().await;
                drop(slot);
                return result.map(|conn| (conn, false));
            }
            drop(slot);
            // Announce the wait before looking again: a checkin that pushes after this
            // look sees `waiting` (the stack's lock orders the two) and notifies.
            let _waiting = Waiting::enter(&self.waiting);
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(conn) = self.checkout_any(here) {
                return Ok((conn, true));
            }
            if self.connecting.load(Ordering::SeqCst) < MAX_CONNECTING_PER_REPLICA {
                continue;
            }
            changed.await;
            if let Some(conn) = self.checkout_any(here) {
                return Ok((conn, true));
            }
        }
    }

    /// An idle connection of this thread, if one is ready: the common case of
    /// [`Self::acquire`], without its future.
    pub(crate) fn checkout_here(&self) -> Option<C> {
        self.checkout(WORKER.get())
    }

    /// An idle connection of any thread, this one's first.
    fn checkout_any(&self, here: usize) -> Option<C> {
        let n = self.stacks.len();
        (0..n).find_map(|i| self.checkout(here + i))
    }

    /// The most recently used idle connection of `thread` that is ready, if any. Closed
    /// ones are dropped; one still finishing its last exchange is left for later.
    fn checkout(&self, thread: usize) -> Option<C> {
        let mut stack = self.stack(thread).lock().ok()?;
        let mut i = stack.len();
        while i > 0 {
            i -= 1;
            if stack[i].0.is_closed() {
                stack.remove(i);
            } else if stack[i].0.is_ready() {
                return Some(stack.remove(i).0);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end at `now`.
    /// Connections idle longer than `idle_timeout` are closed on the way.
    pub(crate) fn checkin(&self, conn: C, now: Instant, idle_timeout: Duration) {
        if conn.is_closed() {
            return;
        }
        let Ok(mut stack) = self.stack(conn.home()).lock() else {
            return;
        };
        let stale = stack
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) > idle_timeout)
            .count();
        stack.drain(..stale);
        if stack.len() < self.max_idle {
            stack.push((conn, now));
        }
        drop(stack);
        self.wake_one();
    }
}

/// A connect in progress, counted in [`IdleConns::connecting`] until it is dropped.
struct Connecting<'a, C> {
    conns: &'a IdleConns<C>,
    /// Under the limit: this request may connect.
    granted: bool,
}

impl<'a, C> Connecting<'a, C> {
    fn enter(conns: &'a IdleConns<C>) -> Self {
        let before = conns.connecting.fetch_add(1, Ordering::SeqCst);
        Self {
            conns,
            granted: before < MAX_CONNECTING_PER_REPLICA,
        }
    }
}

impl<C> Drop for Connecting<'_, C> {
    fn drop(&mut self) {
        self.conns.connecting.fetch_sub(1, Ordering::SeqCst);
        if self.granted {
            // A connect slot is free: a request waiting for one may take it.
            self.conns.wake_one();
        }
    }
}

/// One request counted in [`IdleConns::waiting`] while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a TCP connection within `timeout`, with Nagle off.
async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Tcp { addr, source }),
        Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a new connection and spawns the task that drives it.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<UpstreamBody>, ConnectError> {
    let stream = connect_tcp(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        // One buffer, one `write` per message, as on client connections (`Activator::run`).
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(%addr, error = %e, "replica connection ended with an error");
        }
    });
    Ok(sender)
}
