//! The HTTP/1.1 fast lane: the common exchange, proxied as bytes.
//!
//! Most requests a Function gets are the simple kind: an HTTP/1.1 head in origin form,
//! no body or a small one with a `Content-Length`, for a Function with a replica ready
//! and room on it. For those, this module does what nginx does: it parses the head in
//! place (httparse), writes the head the replica gets straight into a buffer (the
//! client's header lines copied as they are, hop-by-hop ones left out, `X-Forwarded-*`
//! set), sends it on a pooled plain socket (`pool::RawConn`), parses the replica's
//! response head the same way and streams the body back, all inside the client
//! connection's own task. No header map is built, no body channel or client dispatch
//! task sits between the two sockets, and a request costs a fraction of what the same
//! exchange costs through hyper on both sides (BENCHMARKS.md, "Data-plane steps").
//!
//! A request of that shape for a Function that cannot take it at once (at zero, waking,
//! at its concurrency cap or with requests queued) or whose new replica connection
//! fails is served by the full proxy (`proxy::handle`: the queue, the wake and its early
//! routes, retries on other replicas, the error table) on the lane's connection, its
//! head turned into an `http::Request` for that one request; its answer is written back
//! here, and the connection stays in the lane (`zeroscale_activator_lane_full_path_requests_total`).
//! A client that disconnects while its request waits takes it out of the queue, as on
//! hyper's path.
//!
//! Requests the lane does not parse go to hyper's server with the whole connection:
//! upgrades and `h2c`, HTTP/2 and HTTP/1.0, chunked or large request bodies, `Expect`,
//! `X-Zeroscale-*` headers, heads that are malformed or too large, unknown hosts and
//! invalid Functions. The lane decides before it has done anything a client or a replica
//! could see: it hands the connection over together with the bytes it has read, and
//! hyper serves that request and every later one on the connection as if it had read
//! them itself (`zeroscale_activator_lane_handoffs_total`). The lane adds only two
//! answers of its own, for failures after a request was sent: 502 when the replica
//! breaks the exchange before its response head, 504 when that head does not come
//! within the request timeout, both written as `ProxyError::into_response` gives them.
//!
//! What a client and a replica see is what the full path gives them: the same request
//! headers (hop-by-hop removed, `X-Forwarded-*` replaced unless the peer is a trusted
//! proxy, then extended), the response's hop-by-hop headers and a replica's
//! `X-Zeroscale-Cold-Start` removed, a `Date` added when the replica sent none, a
//! response without a length sent chunked, `Connection: close` when the client asked for
//! it, the activator drains or its routing dropped it (`lameduck`). The request counts
//! in the Function's autoscaler counters and metrics exactly as on the full path.

use std::io;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Activator;
use super::balancer;
use super::client::ClientConn;
use super::error::ProxyError;
use super::pool::RawConn;
use super::proxy::{self, RequestGuard};
use super::routing::{Conf, FunctionState};
use crate::api::hosts::normalize_host_ref;

/// Request header lines the lane parses at most (hyper's limit too; more go to hyper,
/// which answers 431).
const MAX_HEADERS: usize = 100;
/// Request bodies the lane reads whole before sending; longer ones stream through hyper.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// Room made in a buffer before a read.
const READ_SIZE: usize = 8 * 1024;
/// Sends of one request on fresh connections after pooled ones turned out closed.
const MAX_STALE_RETRIES: u32 = 3;

/// How the lane left a connection.
pub(crate) enum Ended {
    /// It is over: closed by either side, broken, or ended after a response.
    Closed,
    /// The next request is not the lane's: hyper serves the connection from here,
    /// starting with `read`, the bytes the lane has read and not used.
    Handoff { stream: TcpStream, read: Vec<u8> },
}

/// Why a request left the lane's own path: the `reason` label of
/// `zeroscale_activator_lane_handoffs_total` (the connection went to hyper) or of
/// `zeroscale_activator_lane_full_path_requests_total` (the full proxy served the
/// request on the lane's connection: `Replica`, `Connect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Not an HTTP/1.1 head in origin form, or malformed.
    Protocol,
    /// Hop-by-hop, `Expect`, `Transfer-Encoding` or `X-Zeroscale-*` headers.
    Headers,
    /// A body longer than the lane reads whole, or a bad length.
    Body,
    /// No Host, or none the activator routes.
    Host,
    /// The Function is invalid.
    Function,
    /// No replica ready with room: at zero, waking, at its cap, or requests queued.
    Replica,
    /// A new connection to the replica failed.
    Connect,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Protocol => "protocol",
            Reason::Headers => "headers",
            Reason::Body => "body",
            Reason::Host => "host",
            Reason::Function => "function",
            Reason::Replica => "replica",
            Reason::Connect => "connect",
        }
    }
}

/// Serves requests on a client connection until it ends or a request is not the
/// lane's kind.
pub(crate) async fn serve(
    act: &Arc<Activator>,
    client: &Arc<ClientConn>,
    stream: TcpStream,
) -> Ended {
    let mut lane = Lane {
        act,
        client,
        stream,
        inbuf: Vec::with_capacity(READ_SIZE),
        out: Vec::with_capacity(1024),
        rbuf: Vec::with_capacity(READ_SIZE),
    };
    loop {
        match lane.exchange().await {
            Step::Next => {}
            Step::Close => return Ended::Closed,
            Step::Handoff(reason) => {
                act.metrics
                    .lane_handoffs
                    .with_label_values(&[reason.label()])
                    .inc();
                return Ended::Handoff {
                    stream: lane.stream,
                    read: lane.inbuf,
                };
            }
        }
    }
}

enum Step {
    Next,
    Close,
    Handoff(Reason),
}

struct Lane<'a> {
    act: &'a Arc<Activator>,
    client: &'a Arc<ClientConn>,
    stream: TcpStream,
    /// Bytes read from the client and not yet used, from the start of the next request.
    inbuf: Vec<u8>,
    /// What is written next: the request to the replica, then the response head.
    out: Vec<u8>,
    /// Bytes read from the replica.
    rbuf: Vec<u8>,
}

/// A request the lane takes: its upstream form is in `Lane::out`.
struct Plan {
    fs: Arc<FunctionState>,
    conf: Arc<Conf>,
    /// Bytes of the client's request (head and body) in `inbuf`, and of its head.
    len: usize,
    head_len: usize,
    head: bool,
    /// The client asked to close after this exchange.
    close: bool,
    /// It may be sent again after a pooled connection turned out closed: idempotent,
    /// and no body.
    replayable: bool,
}

enum Parsed {
    /// More bytes are needed.
    Partial,
    Ready(Plan),
    /// Hyper serves it.
    NotOurs(Reason),
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the replica closes; sent to the client chunked.
    Close,
}

/// What the lane reads of a replica's response head.
struct ResponseHead {
    status: u16,
    framing: Framing,
    /// The connection may take another request once the body is read.
    reusable: bool,
    len: usize,
}

/// Why a response head was not read.
enum HeadError {
    /// Writing the request failed: the replica cannot have acted on it.
    Unsent(io::Error),
    /// The replica closed or reset before sending a byte of it.
    Silent(io::Error),
    Broken(io::Error),
}

impl<'a> Lane<'a> {
    /// One exchange, from the next request head to the end of its response.
    async fn exchange(&mut self) -> Step {
        let plan = loop {
            if !self.inbuf.is_empty() {
                match self.parse() {
                    Parsed::Ready(plan) => break plan,
                    Parsed::NotOurs(reason) => return Step::Handoff(reason),
                    Parsed::Partial => {}
                }
            }
            match self.read_client().await {
                Ok(true) => {}
                // A partial head at the end goes unanswered, as hyper leaves it.
                Ok(false) | Err(_) => return Step::Close,
            }
        };
        let act = self.act;
        let fs = &plan.fs;
        let conf = &plan.conf;
        let traffic = fs.traffic(&act.metrics);
        let cap = conf.container_concurrency;
        if cap.is_some()
            && traffic
                .counters
                .queued
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0
        {
            // Requests wait for a slot: this one queues behind them, on the full path.
            return self.full_path(&plan, Reason::Replica).await;
        }
        let Ok(lease) = balancer::pick(&fs.replicas(), cap, &[]) else {
            // At zero, waking or full: the queue and the wake are the full path's.
            return self.full_path(&plan, Reason::Replica).await;
        };
        let replica = lease.replica().clone();
        let idle_timeout = act.settings.pool_idle_timeout;
        let active = self.client.request_started(http::Version::HTTP_11);
        let mut guard = RequestGuard::arrive(fs.clone(), traffic, cap.is_some(), idle_timeout);
        guard.admitted(lease);
        let deadline = guard.start() + conf.request;

        let (mut up, mut pooled) = match replica.raw.checkout_here() {
            Some(c) => (c, true),
            None => {
                let connect = replica
                    .raw
                    .acquire_with(|| RawConn::open(replica.addr, act.settings.connect_timeout));
                match self
                    .client
                    .bound(http::Version::HTTP_11, deadline, connect)
                    .await
                {
                    Ok(Ok(c)) => c,
                    // Trying other replicas is the full path's; nothing was sent yet.
                    _ => {
                        guard.abandon();
                        drop(active);
                        return self.full_path(&plan, Reason::Connect).await;
                    }
                }
            }
        };
        // The request is in `out`; the client's bytes of it are used.
        self.inbuf.drain(..plan.len);

        let closing = self.closing(&plan);
        let mut stale = 0;
        let resp = loop {
            let sent = up.stream.write_all(&self.out).await;
            let head = match sent {
                Ok(()) => {
                    let read = read_response_head(
                        &mut up.stream,
                        &mut self.rbuf,
                        &mut self.out,
                        plan.head,
                        closing,
                    );
                    let bounded = self.client.bound(http::Version::HTTP_11, deadline, read);
                    let limit = self.act.settings.max_header_bytes;
                    match while_connected(&mut self.stream, &mut self.inbuf, limit, bounded).await {
                        // The client left: so does its request (as hyper drops it).
                        None => return Step::Close,
                        Some(Ok(r)) => r,
                        Some(Err(_)) => {
                            let e = ProxyError::RequestTimeout {
                                key: fs.key.clone(),
                                timeout: conf.request,
                            };
                            return self.answer(&plan, e, guard, active).await;
                        }
                    }
                }
                Err(e) => Err(HeadError::Unsent(e)),
            };
            // Sent again on a fresh connection: what was never written, and what may be
            // sent twice (see `Plan::replayable`).
            let again = match &head {
                Err(HeadError::Unsent(_)) => true,
                Err(HeadError::Silent(_)) => plan.replayable,
                _ => false,
            };
            match head {
                Ok(h) => break h,
                // A kept-alive connection the replica had closed: a write fails, or the
                // read finds the end before any byte of a response.
                Err(HeadError::Unsent(e) | HeadError::Silent(e))
                    if again && pooled && stale < MAX_STALE_RETRIES =>
                {
                    debug!(function = %fs.key, error = %e, "stale pooled connection");
                    stale += 1;
                    match RawConn::open(replica.addr, act.settings.connect_timeout).await {
                        Ok(c) => {
                            up = c;
                            pooled = false;
                        }
                        Err(e) => {
                            let e = ProxyError::Upstream {
                                key: fs.key.clone(),
                                source: e.into(),
                            };
                            return self.answer(&plan, e, guard, active).await;
                        }
                    }
                }
                Err(HeadError::Unsent(e) | HeadError::Silent(e) | HeadError::Broken(e)) => {
                    let e = ProxyError::Upstream {
                        key: fs.key.clone(),
                        source: e.into(),
                    };
                    return self.answer(&plan, e, guard, active).await;
                }
            }
        };
        traffic.metrics.count_response(&fs.key, resp.status);

        match self.relay_response(&mut up.stream, &resp).await {
            Relayed::Complete { reusable } => {
                if reusable && resp.reusable {
                    replica.raw.checkin(up, Instant::now(), idle_timeout);
                }
                drop(guard);
                drop(active);
                if closing {
                    let _ = self.stream.shutdown().await;
                    Step::Close
                } else {
                    Step::Next
                }
            }
            Relayed::Broken => Step::Close,
        }
    }

    /// The connection ends after this request's answer: the client asked, the activator
    /// drains, or its routing dropped it (`lameduck`).
    fn closing(&self, plan: &Plan) -> bool {
        plan.close
            || self.client.is_shutting_down()
            || self.act.closing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads more of the client's bytes: `false` at its end. While no request is in
    /// progress, a drain ends the connection instead.
    async fn read_client(&mut self) -> io::Result<bool> {
        self.inbuf.reserve(READ_SIZE);
        let idle = self.inbuf.is_empty();
        let client = self.client;
        let stream = &mut self.stream;
        let inbuf = &mut self.inbuf;
        let mut read = std::pin::pin!(stream.read_buf(inbuf));
        std::future::poll_fn(|cx| {
            if idle && client.is_shutting_down() {
                return Poll::Ready(Ok(false));
            }
            read.as_mut().poll(cx).map_ok(|n| n > 0)
        })
        .await
    }

    /// Looks at the request head in `inbuf`; when the lane takes it, writes what the
    /// replica gets into `out`.
    fn parse(&mut self) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.inbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            // A head over the limit is hyper's to refuse (431).
            Ok(httparse::Status::Partial)
                if self.inbuf.len() < self.act.settings.max_header_bytes =>
            {
                return Parsed::Partial;
            }
            Ok(httparse::Status::Partial) | Err(_) => return Parsed::NotOurs(Reason::Protocol),
        };
        let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::NotOurs(Reason::Protocol);
        };
        if !path.starts_with('/') || method == "CONNECT" {
            return Parsed::NotOurs(Reason::Protocol);
        }
        let mut host: Option<&[u8]> = None;
        let mut length: Option<u64> = None;
        let mut close = false;
        let mut forwarded = false;
        // Each name is classified once; the copy below reads the kinds back.
        let mut kinds = [Kind::Other; MAX_HEADERS];
        for (h, kind) in req.headers.iter().zip(kinds.iter_mut()) {
            *kind = classify(h.name);
            match *kind {
                Kind::Host => {
                    if host.is_some() {
                        return Parsed::NotOurs(Reason::Headers);
                    }
                    host = Some(h.value);
                }
                Kind::ContentLength => {
                    let Some(n) = parse_length(h.value) else {
                        return Parsed::NotOurs(Reason::Body);
                    };
                    if length.is_some_and(|l| l != n) {
                        return Parsed::NotOurs(Reason::Body);
                    }
                    length = Some(n);
                }
                Kind::Connection => match connection_tokens(h.value) {
                    Some(c) => close |= c.close,
                    None => return Parsed::NotOurs(Reason::Headers),
                },
                Kind::Forwarded => forwarded = true,
                // Bodies without a length, upgrades, 100-continue, our own headers:
                // hyper's path knows them.
                Kind::NotOurs | Kind::TransferEncoding | Kind::HopByHop | Kind::ColdStart => {
                    return Parsed::NotOurs(Reason::Headers);
                }
                Kind::Date | Kind::Other => {}
            }
        }
        let Some(raw_host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
            return Parsed::NotOurs(Reason::Host);
        };
        let body = length.unwrap_or(0);
        if body > MAX_BUFFERED_BODY || body > self.act.settings.max_body_bytes {
            return Parsed::NotOurs(Reason::Body);
        }
        let len = head_len + body as usize;
        if self.inbuf.len() < len {
            return Parsed::Partial;
        }
        let Some(normal) = normalize_host_ref(raw_host) else {
            return Parsed::NotOurs(Reason::Host);
        };
        let Some(fs) = self.act.table().lookup(&normal) else {
            return Parsed::NotOurs(Reason::Host);
        };
        drop(normal);
        let conf = fs.conf();
        if conf.invalid.is_some() {
            return Parsed::NotOurs(Reason::Function);
        }

        let out = &mut self.out;
        out.clear();
        for part in [method.as_bytes(), b" ", path.as_bytes(), b" HTTP/1.1\r\n"] {
            out.extend_from_slice(part);
        }
        let info = &self.client.info;
        let trusted = forwarded && info.trusted();
        let mut prior_xff: Vec<&[u8]> = Vec::new();
        let (mut proto_seen, mut host_seen, mut length_sent) = (false, false, false);
        for (h, kind) in req.headers.iter().zip(kinds) {
            match kind {
                Kind::Connection => continue,
                // Repeats of the same length (any other was refused above) go once.
                Kind::ContentLength if length_sent => continue,
                Kind::ContentLength => length_sent = true,
                Kind::Forwarded => match forwarded_kind(h.name) {
                    Some(Fwd::For) => {
                        if trusted {
                            prior_xff.push(h.value);
                        }
                        continue;
                    }
                    Some(Fwd::Proto) if !trusted => continue,
                    Some(Fwd::Host) if !trusted => continue,
                    Some(Fwd::Proto) => proto_seen = true,
                    Some(Fwd::Host) => host_seen = true,
                    None => {}
                },
                _ => {}
            }
            header_line(out, h.name.as_bytes(), h.value);
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        for v in prior_xff {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(info.peer_ip().as_bytes());
        out.extend_from_slice(b"\r\n");
        if !proto_seen {
            out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        }
        if !host_seen {
            header_line(out, b"X-Forwarded-Host", raw_host.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.inbuf[head_len..len]);
        let replayable = body == 0
            && matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            );
        Parsed::Ready(Plan {
            fs,
            conf,
            len,
            head_len,
            head: method == "HEAD",
            close,
            replayable,
        })
    }

    /// Serves the request in `inbuf` through the full proxy (`proxy::handle`: the queue,
    /// the wake and its early routes, retries on other replicas, the error table) and
    /// writes its answer here: the connection stays in the lane.
    async fn full_path(&mut self, plan: &Plan, reason: Reason) -> Step {
        self.act
            .metrics
            .lane_full_path
            .with_label_values(&[reason.label()])
            .inc();
        let Some(req) = self.request_of(plan) else {
            return Step::Handoff(Reason::Protocol);
        };
        self.inbuf.drain(..plan.len);
        let active = self.client.request_started(http::Version::HTTP_11);
        let handled = proxy::handle(self.act, active.client(), req);
        let limit = self.act.settings.max_header_bytes;
        // A client that leaves takes its request out of the queue, as on hyper's path.
        let Some(resp) = while_connected(&mut self.stream, &mut self.inbuf, limit, handled).await
        else {
            return Step::Close;
        };
        // Looked at now: a wake can take long enough for a drain to begin meanwhile.
        let close = self.closing(plan);
        let step = self.write_response(resp, plan.head, close).await;
        drop(active);
        step
    }

    /// The request in `inbuf` as the full proxy takes it.
    fn request_of(&self, plan: &Plan) -> Option<http::Request<Bytes>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed.parse(&self.inbuf[..plan.head_len]).ok()?;
        let mut req = http::Request::builder()
            .method(parsed.method?)
            .uri(parsed.path?)
            .version(http::Version::HTTP_11);
        let map = req.headers_mut()?;
        map.reserve(parsed.headers.len());
        for h in parsed.headers.iter() {
            map.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                http::HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        req.body(Bytes::copy_from_slice(&self.inbuf[plan.head_len..plan.len]))
            .ok()
    }

    /// Writes a response of the full proxy to the client as hyper's server would: its
    /// length when known, chunked when not, a `Date`, `Connection: close` when `close`.
    async fn write_response(
        &mut self,
        resp: http::Response<proxy::ProxyBody>,
        head_request: bool,
        mut close: bool,
    ) -> Step {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status.as_u16();
        let out = &mut self.out;
        out.clear();
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes())
            .or_else(|| parts.status.canonical_reason().map(str::as_bytes))
            .unwrap_or(b"");
        status_line(out, status, reason);
        let (mut length, mut dated) = (false, false);
        for (name, value) in &parts.headers {
            if name == http::header::CONNECTION {
                close |= connection_tokens(value.as_bytes()).is_some_and(|c| c.close);
                continue;
            }
            length |= name == http::header::CONTENT_LENGTH;
            dated |= name == http::header::DATE;
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        let bodiless = head_request || status < 200 || status == 204 || status == 304;
        let mut chunked = false;
        if !bodiless && !length {
            match hyper::body::Body::size_hint(&body).exact() {
                Some(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
                None => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    chunked = true;
                }
            }
        }
        if !dated {
            date_line(out);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !bodiless {
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        if data.is_empty() {
                            continue;
                        }
                        if chunked {
                            chunk(out, &data);
                        } else {
                            out.extend_from_slice(&data);
                        }
                    }
                    Some(Err(_)) => return Step::Close,
                    None => {
                        if chunked {
                            out.extend_from_slice(b"0\r\n\r\n");
                        }
                        break;
                    }
                }
                if self.stream.write_all(out).await.is_err() {
                    return Step::Close;
                }
                out.clear();
            }
        }
        if !out.is_empty() && self.stream.write_all(out).await.is_err() {
            return Step::Close;
        }
        out.clear();
        // The request ends (its guard, its replica connection back to the pool) before
        // the next is read.
        drop(body);
        if close {
            let _ = self.stream.shutdown().await;
            return Step::Close;
        }
        Step::Next
    }

    /// Answers the request with the activator's own error, and counts it.
    async fn answer(
        &mut self,
        plan: &Plan,
        e: ProxyError,
        guard: RequestGuard,
        active: super::client::Active,
    ) -> Step {
        let status = e.status();
        e.log(&plan.fs.key);
        if let Some(t) = plan.fs.traffic_if_any() {
            t.metrics.count_response(&plan.fs.key, status.as_u16());
        }
        drop(guard);
        drop(active);
        // The head and body `ProxyError::into_response` gives the full path, written out.
        let body = format!("{e}\n");
        let resp = e.into_response();
        let mut close = self.closing(plan);
        let out = &mut self.out;
        out.clear();
        status_line(
            out,
            status.as_u16(),
            status.canonical_reason().unwrap_or("").as_bytes(),
        );
        for (name, value) in resp.headers() {
            if name == http::header::CONNECTION {
                close = true;
                continue;
            }
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        date_line(out);
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !plan.head {
            out.extend_from_slice(body.as_bytes());
        }
        if self.stream.write_all(&self.out).await.is_err() || close {
            return Step::Close;
        }
        Step::Next
    }

    /// Sends the response head (in `out`) and streams the body from `up` (the head's
    /// bytes still at the start of `rbuf`) to the client.
    async fn relay_response(&mut self, up: &mut TcpStream, resp: &ResponseHead) -> Relayed {
        self.rbuf.drain(..resp.len);
        let mut body = Body::new(resp.framing);
        // The body bytes that came with the head go out with it.
        let mut reusable = true;
        loop {
            let used = match body.take(&self.rbuf, &mut self.out) {
                Ok(used) => used,
                Err(()) => return Relayed::Broken,
            };
            if used < self.rbuf.len() {
                // Bytes past the end of the response: the replica broke the protocol.
                reusable = false;
            }
            self.rbuf.clear();
            if !self.out.is_empty() {
                if self.stream.write_all(&self.out).await.is_err() {
                    return Relayed::Broken;
                }
                self.out.clear();
            }
            if body.done() {
                return Relayed::Complete { reusable };
            }
            self.rbuf.reserve(READ_SIZE);
            match up.read_buf(&mut self.rbuf).await {
                Ok(0) => {
                    if body.framing == Framing::Close {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                        let _ = self.stream.write_all(&self.out).await;
                        self.out.clear();
                        // The replica closed its connection; the client's is fine.
                        return Relayed::Complete { reusable: false };
                    }
                    // Cut short: the client must not take it for the whole body.
                    return Relayed::Broken;
                }
                Ok(_) => {}
                Err(_) => return Relayed::Broken,
            }
        }
    }
}

enum Relayed {
    /// The whole response reached the client; `reusable`: the replica sent nothing past
    /// its end.
    Complete { reusable: bool },
    /// Either side broke off; the client connection must close.
    Broken,
}

/// Runs `fut` while the client stays connected: `None` when it closes or breaks its
/// connection first. Bytes it sends meanwhile (a pipelined request) are kept in `inbuf`,
/// up to `limit` of them; past that the socket is left alone until `fut` is done.
async fn while_connected<F: Future>(
    stream: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    limit: usize,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        while inbuf.len() < limit {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let mut read = tokio::io::ReadBuf::uninit(&mut chunk);
            match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut *stream), cx, &mut read) {
                Poll::Pending => break,
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(None),
                Poll::Ready(Ok(())) => inbuf.extend_from_slice(read.filled()),
                Poll::Ready(Err(_)) => return Poll::Ready(None),
            }
        }
        Poll::Pending
    })
    .await
}

/// Reads a response head into `buf` (which starts empty), skipping 1xx responses, and
/// writes the client's head for it into `out`.
async fn read_response_head(
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    head_request: bool,
    close: bool,
) -> Result<ResponseHead, HeadError> {
    buf.clear();
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_response_head(buf, head_request, out, close) {
                Ok(Some(h)) if (100..200).contains(&h.status) => {
                    if h.status == 101 {
                        return Err(HeadError::Broken(invalid(
                            "101 to a request without Upgrade",
                        )));
                    }
                    buf.drain(..h.len);
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(HeadError::Broken(e)),
            }
            if buf.len() > 64 * 1024 {
                return Err(HeadError::Broken(invalid("response head too large")));
            }
        }
        buf.reserve(READ_SIZE);
        match up.read_buf(buf).await {
            Ok(0) if !received => {
                return Err(HeadError::Silent(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )));
            }
            Ok(0) => {
                return Err(HeadError::Broken(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )));
            }
            Ok(_) => received = true,
            Err(e) if !received => return Err(HeadError::Silent(e)),
            Err(e) => return Err(HeadError::Broken(e)),
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The response head at the start of `buf`, if complete. A final one (not 1xx) is
/// written into `out` as the client gets it: hop-by-hop headers (and those its
/// `Connection` names) and the cold-start header left out, chunked when it has no
/// length, a `Date` when it has none, and `Connection: close` when `close`.
fn parse_response_head(
    buf: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
    close: bool,
) -> io::Result<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(invalid("malformed response head")),
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut up_close = !http11;
    let mut listed = false;
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, kind) in resp.headers.iter().zip(kinds.iter_mut()) {
        *kind = classify(h.name);
        match *kind {
            Kind::ContentLength => {
                let n = parse_length(h.value).ok_or_else(|| invalid("bad content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(invalid("conflicting content-length"));
                }
                length = Some(n);
            }
            Kind::TransferEncoding => {
                encoded = true;
                chunked = last_token_is(h.value, b"chunked");
            }
            Kind::Connection => match connection_tokens(h.value) {
                Some(c) => {
                    up_close |= c.close;
                    if !http11 && c.keep_alive {
                        up_close = false;
                    }
                }
                None => listed = true,
            },
            _ => {}
        }
    }
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if status < 200 {
        return Ok(Some(ResponseHead {
            status,
            framing,
            reusable: false,
            len,
        }));
    }

    out.clear();
    status_line(out, status, resp.reason.unwrap_or("").as_bytes());
    // Headers the replica's `Connection` names are hop-by-hop too (rare: collected only
    // when it names any).
    let names: Vec<&[u8]> = if listed {
        resp.headers
            .iter()
            .zip(kinds)
            .filter(|(_, kind)| *kind == Kind::Connection)
            .flat_map(|(h, _)| h.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    let unlength = matches!(framing, Framing::Chunked | Framing::Close);
    let mut dated = false;
    for (h, kind) in resp.headers.iter().zip(kinds) {
        match kind {
            Kind::Connection | Kind::HopByHop | Kind::ColdStart | Kind::TransferEncoding => {
                continue;
            }
            Kind::ContentLength if unlength => continue,
            Kind::Date => dated = true,
            _ => {}
        }
        if listed
            && names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        header_line(out, h.name.as_bytes(), h.value);
    }
    if unlength {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !dated {
        date_line(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        status,
        framing,
        reusable: !up_close && framing != Framing::Close,
        len,
    }))
}

/// A response body on its way: how much of it is left.
struct Body {
    framing: Framing,
    remaining: u64,
    chunks: Chunks,
}

impl Body {
    fn new(framing: Framing) -> Self {
        Self {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: Chunks::default(),
        }
    }

    fn done(&self) -> bool {
        match self.framing {
            Framing::None => true,
            Framing::Length(_) => self.remaining == 0,
            Framing::Chunked => self.chunks.state == ChunkState::Done,
            Framing::Close => false,
        }
    }

    /// Moves what belongs to the body from `input` to `out` (chunk-framed for a body
    /// without a length); returns how many bytes of `input` it used.
    fn take(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ()> {
        match self.framing {
            Framing::None => Ok(0),
            Framing::Length(_) => {
                let n = input
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[..n]);
                self.remaining -= n as u64;
                Ok(n)
            }
            Framing::Chunked => {
                let n = self.chunks.scan(input)?;
                out.extend_from_slice(&input[..n]);
                Ok(n)
            }
            Framing::Close => {
                if !input.is_empty() {
                    chunk(out, input);
                }
                Ok(input.len())
            }
        }
    }
}

/// Where a chunked body is: it is passed on as it is, and read only to find its end.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
enum ChunkState {
    /// In a chunk-size line, `digits` read so far.
    #[default]
    Size,
    /// After the size: extensions, up to CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u32,
}

impl Chunks {
    /// Follows the framing through `input`; returns the bytes up to the end of the body
    /// (all of them if it does not end there).
    fn scan(&mut self, input: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < input.len() && self.state != ChunkState::Done {
            let b = input[i];
            match self.state {
                ChunkState::Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(());
                        }
                        self.size = self.size * 16 + u64::from(d);
                    }
                    None if self.digits == 0 => return Err(()),
                    None if b == b'\r' => self.state = ChunkState::SizeLf,
                    None if b == b';' || b == b' ' || b == b'\t' => {
                        self.state = ChunkState::Extension;
                    }
                    None => return Err(()),
                },
                ChunkState::Extension => {
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' {
                        return Err(());
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(());
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    self.state = if b == b'\r' {
                        ChunkState::EndLf
                    } else {
                        ChunkState::TrailerLine
                    };
                }
                ChunkState::TrailerLine => {
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    }
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::Done;
                }
                ChunkState::Done => {}
            }
            i += 1;
        }
        Ok(i)
    }
}

/// What a header name means to the lane.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Host,
    ContentLength,
    Connection,
    Date,
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`.
    HopByHop,
    TransferEncoding,
    /// `Expect`, `X-Zeroscale-*` but the cold-start header.
    NotOurs,
    ColdStart,
    /// `X-Forwarded-*`.
    Forwarded,
    Other,
}

fn classify(name: &str) -> Kind {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        4 if is("host") => Kind::Host,
        4 if is("date") => Kind::Date,
        14 if is("content-length") => Kind::ContentLength,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        16 if is("proxy-connection") => Kind::HopByHop,
        2 if is("te") => Kind::HopByHop,
        7 if is("trailer") => Kind::HopByHop,
        7 if is("upgrade") => Kind::HopByHop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        6 if is("expect") => Kind::NotOurs,
        _ => {
            let b = name.as_bytes();
            if b.len() > 2 && b[..2].eq_ignore_ascii_case(b"x-") {
                let rest = &b[2..];
                if rest.len() >= 10 && rest[..10].eq_ignore_ascii_case(b"zeroscale-") {
                    if name.eq_ignore_ascii_case(crate::api::COLD_START_HEADER) {
                        return Kind::ColdStart;
                    }
                    return Kind::NotOurs;
                }
                if rest.len() >= 10 && rest[..10].eq_ignore_ascii_case(b"forwarded-") {
                    return Kind::Forwarded;
                }
            }
            Kind::Other
        }
    }
}

enum Fwd {
    For,
    Proto,
    Host,
}

fn forwarded_kind(name: &str) -> Option<Fwd> {
    let rest = &name[12..];
    if rest.eq_ignore_ascii_case("for") {
        Some(Fwd::For)
    } else if rest.eq_ignore_ascii_case("proto") {
        Some(Fwd::Proto)
    } else if rest.eq_ignore_ascii_case("host") {
        Some(Fwd::Host)
    } else {
        None
    }
}

struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

/// A `Connection` value of only `close` and `keep-alive`; `None` when it names other
/// headers (the full path strips those).
fn connection_tokens(value: &[u8]) -> Option<ConnectionTokens> {
    let mut c = ConnectionTokens {
        close: false,
        keep_alive: false,
    };
    for t in value.split(|b| *b == b',') {
        let t = t.trim_ascii();
        if t.eq_ignore_ascii_case(b"close") {
            c.close = true;
        } else if t.eq_ignore_ascii_case(b"keep-alive") {
            c.keep_alive = true;
        } else if !t.is_empty() {
            return None;
        }
    }
    Some(c)
}

fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `data` as one chunk of a chunked body.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` line of the current second.
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

fn date_line(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != secs || line.is_empty() {
            *at = secs;
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] = b"5\r\nhello\r\n6;ext=\"a b\"\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";

    #[test]
    fn a_chunked_body_ends_where_its_framing_says_in_any_split() {
        let mut message = CHUNKED.to_vec();
        message.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..message.len() {
            let mut c = Chunks::default();
            let first = c.scan(&message[..split]).unwrap();
            assert_eq!(first, split.min(CHUNKED.len()), "split at {split}");
            let second = c.scan(&message[first..]).unwrap();
            assert_eq!(first + second, CHUNKED.len(), "split at {split}");
            assert_eq!(c.state, ChunkState::Done);
        }
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"5\nhello",
            b"ffffffffffffffff0\r\n",
        ] {
            assert!(
                Chunks::default().scan(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn head(raw: &[u8], head_request: bool) -> (io::Result<Option<ResponseHead>>, String) {
        let mut out = Vec::new();
        let h = parse_response_head(raw, head_request, &mut out, false);
        (h, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing =
            |raw: &[u8], head_request| head(raw, head_request).0.unwrap().unwrap().framing;
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", false),
            Framing::Length(7)
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true),
            Framing::None
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
                false
            ),
            Framing::None
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 7\r\n\r\n",
                false
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Framing::Close
        );
        assert_eq!(framing(b"HTTP/1.0 200 OK\r\n\r\n", false), Framing::Close);
        assert!(
            head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n",
                false
            )
            .0
            .is_err()
        );
        assert!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false)
                .0
                .is_err()
        );
        assert!(
            head(b"HTTP/1.1 200 OK\r\nContent-Len", false)
                .0
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn only_a_keep_alive_replica_connection_is_reused() {
        let reusable = |raw: &[u8]| head(raw, false).0.unwrap().unwrap().reusable;
        assert!(reusable(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ));
        assert!(!reusable(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(reusable(
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!reusable(b"HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn the_client_gets_no_hop_by_hop_header_and_a_length_or_chunks() {
        let (_, out) = head(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, close\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nX-Zeroscale-Cold-Start: true\r\nX-Zeroscale-Other: kept\r\nUpgrade: h2c\r\nTrailer: x\r\nX-App: 1\r\n\r\n",
            false,
        );
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let names: Vec<&str> = out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n))
            .collect();
        assert_eq!(
            names,
            ["X-Zeroscale-Other", "X-App", "transfer-encoding", "date"],
            "{out}"
        );
    }

    #[test]
    fn request_header_names_are_classified_without_regard_to_case() {
        assert_eq!(classify("HOST"), Kind::Host);
        assert_eq!(classify("Content-Length"), Kind::ContentLength);
        assert_eq!(classify("transfer-ENCODING"), Kind::TransferEncoding);
        assert_eq!(classify("Expect"), Kind::NotOurs);
        assert_eq!(classify("X-Forwarded-Proto"), Kind::Forwarded);
        assert_eq!(classify("x-zeroscale-cold-start"), Kind::ColdStart);
        assert_eq!(classify("X-Zeroscale-Anything"), Kind::NotOurs);
        assert_eq!(classify("TE"), Kind::HopByHop);
        assert_eq!(classify("x-app"), Kind::Other);
        assert!(connection_tokens(b"Keep-Alive , close").is_some_and(|c| c.close && c.keep_alive));
        assert!(connection_tokens(b"close, x-secret").is_none());
    }
}
