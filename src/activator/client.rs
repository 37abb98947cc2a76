//! One client connection: what the proxy knows of its peer, and the one timer that bounds
//! both the wait for its next request head (`header_read_timeout`, which also closes
//! keep-alive connections idle that long) and its requests' wait for a replica's
//! response head (`timeouts.request`).
//!
//! Why not hyper's `header_read_timeout` and a `tokio::time::timeout` per request: each
//! arms a timer per request (hyper boxes a fresh sleep for every head it reads), and a
//! timer-wheel insertion and removal per request was a measurable share of the
//! activator's cost, for deadlines seconds or minutes away that almost never fire. Here
//! each HTTP/1 connection has one [`Sleep`], armed no later than the earliest deadline it
//! watches and re-armed only when it fires: a request records its deadline with two
//! atomic stores, and with the default settings (request timeout longer than the header
//! timeout) the timer is touched once per header timeout per connection, not per
//! request. HTTP/2 requests share a connection, so each keeps its own timer, and hyper
//! never applied the header timeout to HTTP/2: neither does this.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::proxy::{ConnInfo, ProxyBody};

/// No deadline recorded.
const NONE: u64 = u64::MAX;

/// The HTTP/2 connection preface: a connection starting with it speaks HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection's state, shared by its requests and its [`Watched`] future. Times
/// are nanoseconds since the connection was accepted.
pub(crate) struct ClientConn {
    pub(crate) info: ConnInfo,
    accepted: Instant,
    header_timeout: u64,
    /// Requests whose response has not ended.
    busy: AtomicU32,
    /// When the last response ended (the wait for the next head began).
    idle_since: AtomicU64,
    /// Deadline of the request waiting for a response head, or [`NONE`].
    deadline: AtomicU64,
    /// That deadline passed.
    expired: AtomicBool,
    /// What the timer is armed for.
    armed: AtomicU64,
    /// A deadline earlier than `armed` was recorded: re-arm.
    rearm: AtomicBool,
    /// The connection speaks HTTP/2.
    h2: AtomicBool,
    /// The drain asked the connection to end after the request in progress (the fast
    /// lane's graceful shutdown; hyper keeps its own).
    shutting_down: AtomicBool,
}

impl ClientConn {
    pub(crate) fn new(
        peer: SocketAddr,
        trusted_proxies: &[ipnet::IpNet],
        header_timeout: Duration,
    ) -> Arc<Self> {
        let header_timeout = nanos(header_timeout);
        Arc::new(Self {
            info: ConnInfo::new(peer, trusted_proxies),
            accepted: Instant::now(),
            header_timeout,
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            deadline: AtomicU64::new(NONE),
            expired: AtomicBool::new(false),
            armed: AtomicU64::new(header_timeout),
            rearm: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Asks the connection to end once no request is in progress.
    pub(crate) fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// [`Self::shut_down`] was called.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    fn since_accepted(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.accepted))
    }

    fn at(&self, since_accepted: u64) -> Instant {
        self.accepted + Duration::from_nanos(since_accepted)
    }

    /// A request arrived; it is in progress until the returned [`Active`] is dropped
    /// (it goes into the response's [`ClientBody`]).
    pub(crate) fn request_started(self: &Arc<Self>, version: Version) -> Active {
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    fn request_ended(&self) {
        let now = self.since_accepted(Instant::now());
        self.idle_since.store(now, Ordering::Release);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// Bounds `fut` by `deadline`: on this connection's timer for HTTP/1 requests, on a
    /// timer of its own for HTTP/2 ones (many share the connection).
    pub(crate) fn bound<F: Future>(
        &self,
        version: Version,
        deadline: Instant,
        fut: F,
    ) -> Bounded<'_, F> {
        Bounded {
            fut,
            own_timer: None,
            registration: Registration {
                conn: self,
                shared: version != Version::HTTP_2,
                registered: false,
            },
            deadline,
        }
    }

    /// What the timer found when it fired (or was asked to re-arm) at `now`.
    fn tick(&self, now: Instant) -> Tick {
        let now = self.since_accepted(now);
        // Nothing to watch: look again one header timeout later.
        let mut next = now.saturating_add(self.header_timeout);
        if !self.h2.load(Ordering::Relaxed) && self.busy.load(Ordering::Acquire) == 0 {
            let due = self
                .idle_since
                .load(Ordering::Acquire)
                .saturating_add(self.header_timeout);
            if due <= now {
                return Tick::Close;
            }
            next = next.min(due);
        }
        let deadline = self.deadline.load(Ordering::Acquire);
        let mut expired = false;
        if deadline != NONE && !self.expired.load(Ordering::Acquire) {
            if deadline <= now {
                self.expired.store(true, Ordering::Release);
                expired = true;
            } else {
                next = next.min(deadline);
            }
        }
        self.armed.store(next, Ordering::Release);
        if expired {
            Tick::Expired(self.at(next))
        } else {
            Tick::Next(self.at(next))
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NONE - 1)
}

enum Tick {
    /// No request head within the header timeout: close the connection.
    Close,
    /// The waiting request's deadline passed; it must be polled to see it.
    Expired(Instant),
    /// Arm the timer for this instant.
    Next(Instant),
}

/// A request's deadline as recorded on its connection; cleared when it is dropped.
struct Registration<'a> {
    conn: &'a ClientConn,
    shared: bool,
    registered: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.registered {
            self.conn.deadline.store(NONE, Ordering::Release);
            self.conn.expired.store(false, Ordering::Release);
        }
    }
}

/// The deadline of [`ClientConn::bound`] passed.
#[derive(Debug)]
pub(crate) struct Elapsed;

pin_project! {
    /// A future bounded by a deadline; see [`ClientConn::bound`].
    pub(crate) struct Bounded<'a, F> {
        #[pin]
        fut: F,
        #[pin]
        own_timer: Option<Sleep>,
        registration: Registration<'a>,
        deadline: Instant,
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let reg = this.registration;
        if !reg.shared {
            if this.own_timer.is_none() {
                this.own_timer
                    .set(Some(tokio::time::sleep_until(*this.deadline)));
            }
            return match this.own_timer.as_pin_mut().map(|t| t.poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(Elapsed)),
                _ => Poll::Pending,
            };
        }
        if !reg.registered {
            // The first time it waits: record the deadline, and have the timer re-armed
            // if it is set for later than that.
            let conn = reg.conn;
            let deadline = conn.since_accepted(*this.deadline);
            conn.expired.store(false, Ordering::Release);
            conn.deadline.store(deadline, Ordering::Release);
            if deadline < conn.armed.load(Ordering::Acquire) {
                conn.rearm.store(true, Ordering::Release);
            }
            reg.registered = true;
            return Poll::Pending;
        }
        if reg.conn.expired.load(Ordering::Acquire) {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

/// The activator's drain: when it starts, every connection finishes the request in
/// progress and closes; [`Drain::drain`] returns when all have.
///
/// hyper-util's `GracefulShutdown` does the same but polls a `watch::Receiver::changed`
/// future (a waiter-list lock) on every poll of every connection; a connection here
/// registers its wake-up once and then checks an atomic version.
pub(crate) struct Drain {
    tx: watch::Sender<()>,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::Sender::new(()),
        }
    }

    pub(crate) fn watcher(&self) -> DrainWatch {
        DrainWatch::new(self.tx.subscribe())
    }

    /// Tells every connection to finish, and waits until all have.
    pub(crate) async fn drain(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// One connection's view of the [`Drain`].
pub(crate) struct DrainWatch {
    rx: watch::Receiver<()>,
    /// Wakes the connection's task when the drain starts; polled once, to register.
    wake: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl DrainWatch {
    /// A second view of the same drain, for the part of a connection served after a
    /// first one ended (a drain already started shows in it too).
    pub(crate) fn again(&self) -> DrainWatch {
        DrainWatch::new(self.rx.clone())
    }

    fn new(rx: watch::Receiver<()>) -> DrainWatch {
        let mut waiting = rx.clone();
        DrainWatch {
            rx,
            wake: Box::pin(async move {
                let _ = waiting.changed().await;
            }),
            registered: false,
        }
    }

    fn started(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.registered {
            self.registered = true;
            if self.wake.as_mut().poll(cx).is_ready() {
                return true;
            }
        }
        self.rx.has_changed().unwrap_or(true)
    }
}

pin_project! {
    /// A client connection's future with its timer: ends the connection when no request
    /// head arrives within the header timeout, tells a waiting request when its deadline
    /// has passed, and starts the connection's graceful shutdown (`shut_down`) when the
    /// activator drains. Resolves to `None` when it closed the connection itself.
    pub(crate) struct Watched<F, D> {
        #[pin]
        conn: F,
        #[pin]
        timer: Sleep,
        client: Arc<ClientConn>,
        drain: DrainWatch,
        draining: bool,
        shut_down: D,
    }
}

impl<F, D: FnMut(Pin<&mut F>)> Watched<F, D> {
    pub(crate) fn new(conn: F, client: Arc<ClientConn>, drain: DrainWatch, shut_down: D) -> Self {
        let first = client.at(client.armed.load(Ordering::Acquire));
        Self {
            conn,
            timer: tokio::time::sleep_until(first),
            client,
            drain,
            draining: false,
            shut_down,
        }
    }
}

impl<F: Future, D: FnMut(Pin<&mut F>)> Future for Watched<F, D> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.draining && this.drain.started(cx) {
            *this.draining = true;
            (this.shut_down)(this.conn.as_mut());
        }
        loop {
            let fired = this.timer.as_mut().poll(cx).is_ready();
            let rearm = this.client.rearm.load(Ordering::Acquire)
                && this.client.rearm.swap(false, Ordering::AcqRel);
            if fired || rearm {
                let next = match this.client.tick(Instant::now()) {
                    Tick::Close => return Poll::Ready(None),
                    Tick::Expired(next) => {
                        // The request is polled inside the connection: make sure it is.
                        cx.waker().wake_by_ref();
                        next
                    }
                    Tick::Next(next) => next,
                };
                this.timer.as_mut().reset(next);
                continue;
            }
            if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            // A request polled just now may have recorded an earlier deadline.
            if !this.client.rearm.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
    }
}

/// A request in progress on its connection, from its head to the end of its response.
pub(crate) struct Active(Arc<ClientConn>);

impl Active {
    pub(crate) fn client(&self) -> &ClientConn {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that ends its request on the connection when dropped (hyper drops it
/// once it is written, or when the exchange breaks).
pub(crate) struct ClientBody {
    body: ProxyBody,
    _active: Active,
}

impl ClientBody {
    pub(crate) fn new(body: ProxyBody, active: Active) -> Self {
        Self {
            body,
            _active: active,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, telling its [`ClientConn`] when the first bytes are the HTTP/2
/// preface (hyper applies no header timeout to HTTP/2, and neither does the timer).
pub(crate) struct ClientIo {
    io: TokioIo<TcpStream>,
    client: Arc<ClientConn>,
    /// Bytes of the preface matched so far; `None` once decided.
    preface: Option<usize>,
    /// Bytes read from the socket before hyper took it (by the fast lane), read first.
    read: Bytes,
}

impl ClientIo {
    #[cfg(test)]
    pub(crate) fn new(stream: TcpStream, client: Arc<ClientConn>) -> Self {
        Self::with_read(stream, Vec::new(), client)
    }

    /// A socket of which `read` was already read.
    pub(crate) fn with_read(stream: TcpStream, read: Vec<u8>, client: Arc<ClientConn>) -> Self {
        Self {
            io: TokioIo::new(stream),
            client,
            preface: Some(0),
            read: Bytes::from(read),
        }
    }

    /// Follows the preface through `got`, the next bytes read.
    fn match_preface(&mut self, matched: usize, got: &[u8]) {
        let end = (matched + got.len()).min(H2_PREFACE.len());
        let got = &got[..end - matched];
        self.preface = if got.is_empty() || got != &H2_PREFACE[matched..end] {
            None
        } else if end == H2_PREFACE.len() {
            self.client.h2.store(true, Ordering::Relaxed);
            None
        } else {
            Some(end)
        };
    }

    /// Reads the first bytes through a small buffer of our own to look at them.
    fn poll_read_first(
        &mut self,
        cx: &mut Context<'_>,
        matched: usize,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut first = [0u8; H2_PREFACE.len()];
        let room = buf.remaining().min(H2_PREFACE.len() - matched);
        let mut read = ReadBuf::new(&mut first[..room]);
        ready!(tokio::io::AsyncRead::poll_read(
            Pin::new(self.io.inner_mut()),
            cx,
            &mut read
        ))?;
        let got = read.filled();
        self.match_preface(matched, got);
        buf.put_slice(got);
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            let got = this.read.split_to(n);
            if let Some(matched) = this.preface {
                this.match_preface(matched, &got);
            }
            buf.put_slice(&got);
            return Poll::Ready(Ok(()));
        }
        match this.preface {
            Some(matched) => this.poll_read_first(cx, matched, buf),
            None => Pin::new(&mut this.io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched<F: Future>(conn: F, client: Arc<ClientConn>) -> Watched<F, impl FnMut(Pin<&mut F>)> {
        // A drain that never starts: its sender outlives the test (a connection whose
        // drain sender is gone drains).
        let drain = Box::leak(Box::new(Drain::new()));
        Watched::new(conn, client, drain.watcher(), |_| {})
    }

    fn conn(header_timeout: Duration) -> Arc<ClientConn> {
        ClientConn::new("127.0.0.1:1".parse().unwrap(), &[], header_timeout)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_header_timeout() {
        let c = conn(Duration::from_secs(2));
        let started = Instant::now();
        let out = watched(futures::future::pending::<()>(), c).await;
        assert!(out.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_timeout_runs_from_the_end_of_the_last_response() {
        let c = conn(Duration::from_secs(2));
        let watched = tokio::spawn(watched(futures::future::pending::<()>(), c.clone()));
        let active = c.request_started(Version::HTTP_11);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !watched.is_finished(),
            "closed while a request was in progress"
        );
        drop(ClientBody::new(ProxyBody::empty_for_test(), active));
        let ended = Instant::now();
        let out = watched.await.unwrap();
        assert!(out.is_none());
        assert_eq!(ended.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_has_no_header_timeout() {
        let c = conn(Duration::from_secs(2));
        c.h2.store(true, Ordering::Relaxed);
        let watched = tokio::spawn(watched(futures::future::pending::<()>(), c));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watched.is_finished());
        watched.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_deadline_earlier_than_the_timer_is_kept() {
        let c = conn(Duration::from_secs(3600));
        let client = c.clone();
        let request = async move {
            let started = Instant::now();
            let waited = client
                .bound(
                    Version::HTTP_11,
                    started + Duration::from_secs(3),
                    futures::future::pending::<()>(),
                )
                .await;
            (waited.is_err(), started.elapsed())
        };
        let _active = c.request_started(Version::HTTP_11);
        let (elapsed, took) = watched(request, c).await.unwrap();
        assert!(elapsed);
        assert_eq!(took, Duration::from_secs(3));
    }

    /// Reads everything `sent` through a [`ClientIo`], in reads of at most `chunk` bytes.
    async fn read_through(sent: &'static [u8], chunk: usize) -> (Vec<u8>, bool) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for part in sent.chunks(3) {
                s.write_all(part).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        let c = conn(Duration::from_secs(10));
        let mut io = ClientIo::new(stream, c.clone());
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); chunk];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
            std::future::poll_fn(|cx| {
                hyper::rt::Read::poll_read(Pin::new(&mut io), cx, buf.unfilled())
            })
            .await
            .unwrap();
            got.extend_from_slice(buf.filled());
        }
        writer.await.unwrap();
        (got, c.h2.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn the_http2_preface_is_recognised_and_passed_on() {
        let (got, h2) = read_through(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0", 24).await;
        assert!(h2);
        assert_eq!(got, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0");
        let (got, h2) = read_through(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", 8192).await;
        assert!(!h2);
        assert_eq!(got, b"POST / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_requests_keep_their_own_timers() {
        let c = conn(Duration::from_secs(3600));
        let started = Instant::now();
        let waited = c
            .bound(
                Version::HTTP_2,
                started + Duration::from_secs(3),
                futures::future::pending::<()>(),
            )
            .await;
        assert!(waited.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
