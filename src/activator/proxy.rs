//! The proxy: one request from routing to the end of its response. Bodies stream both
//! ways through small wrapper bodies (a size limit on the way in, in-flight accounting on
//! the way out); upgrades become a byte tunnel; a connect failure is retried on another
//! replica only while the request body is still untouched.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use super::Activator;
use super::balancer::Lease;
use super::client::ClientConn;
use super::error::ProxyError;
use super::gate::{self, Admitted, Traffic};
use super::pool;
use super::routing::{Conf, FunctionState};
use crate::api::COLD_START_HEADER;
use crate::api::hosts::normalize_host_ref;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static COLD_START: HeaderName = HeaderName::from_static(COLD_START_HEADER);
const ZEROSCALE_PREFIX: &str = "x-zeroscale-";
const FORWARDED_PREFIX: &str = "x-forwarded-";

/// What the proxy knows of a client connection, computed once per connection.
pub(crate) struct ConnInfo {
    peer_ip: HeaderValue,
    trusted: bool,
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr, trusted_proxies: &[ipnet::IpNet]) -> Self {
        let ip = peer.ip().to_canonical();
        Self {
            peer_ip: HeaderValue::try_from(ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            trusted: trusted_proxies.iter().any(|n| n.contains(&ip)),
        }
    }

    /// The peer's address, as `X-Forwarded-For` gives it.
    pub(crate) fn peer_ip(&self) -> &HeaderValue {
        &self.peer_ip
    }

    /// The peer is a trusted proxy: its `X-Forwarded-*` headers are kept and extended.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted
    }

    #[cfg(test)]
    fn for_test(ip: std::net::IpAddr, trusted: bool) -> Self {
        Self {
            peer_ip: HeaderValue::try_from(ip.to_string()).unwrap(),
            trusted,
        }
    }
}

/// Serves one request: routes it, proxies it, and maps any failure to its answer.
pub(crate) async fn handle<B: RequestBody>(
    act: &Arc<Activator>,
    client: &ClientConn,
    req: Request<B>,
) -> Response<ProxyBody> {
    let head = RequestHead::of(req.headers());
    let Some(host) = request_host(head.host.as_ref(), req.uri()) else {
        return ProxyError::BadRequest("missing or malformed Host").into_response();
    };
    let found = act.table().lookup(&host);
    let Some(fs) = found else {
        if let Some(key) = super::drain::drain_request(&host, req.uri().path()) {
            return super::drain::serve(act, key).await;
        }
        return ProxyError::UnknownHost(host.into_owned()).into_response();
    };
    let traffic = fs.traffic(&act.metrics);
    let conf = fs.conf();
    let guard = RequestGuard::arrive(
        fs.clone(),
        traffic,
        conf.container_concurrency.is_some(),
        act.settings.pool_idle_timeout,
    );
    // No span per request: the events below carry the Function themselves, and a span
    // (even a disabled one) costs its setup on every request.
    let resp = match forward(act, &fs, &conf, traffic, guard, client, req, head).await {
        Ok(resp) => resp,
        Err(e) => {
            e.log(&fs.key);
            e.into_response()
        }
    };
    traffic
        .metrics
        .count_response(&fs.key, resp.status().as_u16());
    resp
}

/// The host a request is for: its `Host` header, else the URI authority (HTTP/2),
/// normalised.
fn request_host<'a>(host: Option<&'a HeaderValue>, uri: &'a Uri) -> Option<Cow<'a, str>> {
    match host {
        Some(h) => normalize_host_ref(h.to_str().ok()?),
        None => normalize_host_ref(uri.authority()?.as_str()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward<B: RequestBody>(
    act: &Arc<Activator>,
    fs: &Arc<FunctionState>,
    conf: &Conf,
    traffic: &Traffic,
    mut guard: RequestGuard,
    client: &ClientConn,
    mut req: Request<B>,
    head: RequestHead,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Some(reason) = &conf.invalid {
        return Err(ProxyError::InvalidFunction {
            key: fs.key.clone(),
            reason: reason.clone(),
        });
    }
    let limit = act.settings.max_body_bytes;
    if head.content_length.is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let scan = head.scan;
    let upgrade = if scan.connection {
        upgrade_protocol(&req)
    } else {
        None
    };
    // HTTP/2 has no Host header: the replica gets the authority's host instead.
    let fallback_host = if head.host.is_some() {
        None
    } else {
        request_host(None, req.uri()).and_then(|h| HeaderValue::try_from(h.as_ref()).ok())
    };
    // The response speaks the client's HTTP version, not the replica's: an HTTP/1.0
    // replica (python's http.server) must not cost an HTTP/1.1 client its keep-alive.
    let client_version = req.version();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    // The head is edited where it is (each move of a request head is a copy of a few
    // hundred bytes).
    prepare_request_headers(
        req.headers_mut(),
        scan,
        head.host,
        &client.info,
        fallback_host,
        upgrade,
    );
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.version_mut() = Version::HTTP_11;
    // Origin-form on the wire, whatever form the client used.
    *req.uri_mut() = Uri::from(path);
    let mut up = req.map(|body| body.into_upstream(limit));

    let deadline = guard.start + conf.activation;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut stale = 0;
    let mut replays = 0;
    let mut refused: u32 = 0;
    let mut cold = false;
    // A replica routed early may fail, or answer 5xx, where the platform's own verdict
    // would not have sent the request yet: only requests that can be sent again go there.
    let early_ok = act.settings.cold_start_probe && replayable(&up);
    // `up` is only ever handed to a replica connection; each failure before it was
    // written gives it back, so a retry resends the same request, body untouched.
    let (resp, upstream) = loop {
        let Admitted {
            lease,
            cold: woken,
            queued,
            early,
        } = gate::admit(act, fs, conf, traffic, deadline, &tried, early_ok).await?;
        cold |= woken;
        let replica = lease.replica().clone();
        guard.admitted(lease);
        // For a replay: the request as it is now (empty body, see `replayable`).
        let replay = early.then(|| copy_request(&up));

        // From now: admitted at once on the first attempt is admitted at arrival.
        let admitted_at = if queued || !tried.is_empty() || stale > 0 || replays > 0 || refused > 0
        {
            Instant::now()
        } else {
            guard.start
        };
        let request_deadline = admitted_at + conf.request;
        // An idle connection of this thread is taken without building (and moving) the
        // future that would connect.
        let acquired = match replica.idle.checkout_here() {
            Some(conn) => Ok((conn, true)),
            None => client
                .bound(
                    client_version,
                    request_deadline,
                    replica
                        .idle
                        .acquire(replica.addr, act.settings.connect_timeout),
                )
                .await
                .map_err(|_| ProxyError::RequestTimeout {
                    key: fs.key.clone(),
                    timeout: conf.request,
                })?,
        };
        let (mut upstream, pooled) = match acquired {
            Ok(c) => c,
            Err(e) => {
                debug!(function = %fs.key, error = %e, early, "replica unreachable, trying another");
                guard.release(Instant::now());
                if early {
                    // Its own check passed; the platform will tell. Not a tried replica:
                    // when the platform lists it, it is one like any other.
                    act.demote_early(fs, replica.addr, "connect_failed");
                    replays += 1;
                } else if cold && e.is_refused() && Instant::now() < deadline {
                    // A replica of a wake that does not listen yet: without a readiness
                    // probe the kubelet calls a pod ready as soon as its container runs,
                    // before the app listens. Nothing was sent; try it again shortly,
                    // within the activation timeout, rather than answer 502.
                    refused += 1;
                    let pause = REFUSED_PAUSE_FIRST
                        .saturating_mul(1 << refused.min(4))
                        .min(REFUSED_PAUSE_MAX);
                    client
                        .bound(client_version, deadline, tokio::time::sleep(pause))
                        .await
                        .map_err(|_| ProxyError::ActivationTimeout {
                            key: fs.key.clone(),
                            timeout: conf.activation,
                        })?;
                } else {
                    tried.push(replica.addr);
                }
                continue;
            }
        };
        // Pinned where it is: the future holds the request until it is sent.
        let sent = upstream.try_send_request(up);
        tokio::pin!(sent);
        match client.bound(client_version, request_deadline, sent).await {
            Err(_) => {
                return Err(ProxyError::RequestTimeout {
                    key: fs.key.clone(),
                    timeout: conf.request,
                });
            }
            Ok(Ok(resp)) => match replay {
                Some(again) if resp.status().is_server_error() => {
                    debug!(function = %fs.key, replica = %replica.addr, status = %resp.status(),
                        "a replica routed early answered 5xx; replaying the request");
                    drop(resp);
                    guard.release(Instant::now());
                    act.demote_early(fs, replica.addr, "server_error");
                    act.metrics
                        .early_requests
                        .with_label_values(&["replayed"])
                        .inc();
                    replays += 1;
                    up = again;
                }
                Some(_) => {
                    act.metrics
                        .early_requests
                        .with_label_values(&["answered"])
                        .inc();
                    break (resp, upstream);
                }
                None => break (resp, upstream),
            },
            Ok(Err(mut e)) => {
                if is_body_too_large(e.error()) {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                guard.release(Instant::now());
                let unsent = match (e.take_message(), replay) {
                    (Some(unsent), _) => unsent,
                    // Sent, and the replica failed before answering: a replica routed
                    // early gets no benefit of the doubt, the request goes again.
                    (None, Some(again)) => {
                        debug!(function = %fs.key, replica = %replica.addr, error = %e.error(),
                            "a replica routed early failed; replaying the request");
                        act.demote_early(fs, replica.addr, "reset");
                        act.metrics
                            .early_requests
                            .with_label_values(&["replayed"])
                            .inc();
                        replays += 1;
                        up = again;
                        continue;
                    }
                    (None, None) => {
                        return Err(ProxyError::Upstream {
                            key: fs.key.clone(),
                            source: e.into_error().into(),
                        });
                    }
                };
                up = unsent;
                if pooled && stale < MAX_STALE_RETRIES {
                    // A kept-alive connection the replica had closed: try a fresh one.
                    debug!(function = %fs.key, error = %e.error(), "stale pooled connection");
                    stale += 1;
                } else if early {
                    debug!(function = %fs.key, replica = %replica.addr, error = %e.error(),
                        "a replica routed early failed before the request was sent");
                    act.demote_early(fs, replica.addr, "reset");
                    replays += 1;
                } else {
                    debug!(function = %fs.key, replica = %replica.addr, error = %e.error(),
                        "replica failed before the request was sent, trying another");
                    tried.push(replica.addr);
                }
            }
        }
    };

    let mut resp = resp;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        parts.version = client_version;
        strip_hop_by_hop(&mut parts.headers, true);
        let key = fs.key.clone();
        tokio::spawn(async move {
            // The tunnel counts as a request in flight until it closes.
            let _guard = guard;
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        debug!(function = %key, error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => debug!(function = %key, error = %e, "upgrade failed"),
            }
        });
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }

    *resp.version_mut() = client_version;
    let headers = resp.headers_mut();
    let scan = HeaderScan::of(headers);
    if scan.hop_by_hop {
        strip_hop_by_hop(headers, false);
    }
    // Only the activator says whether a response waited for a wake.
    if scan.cold_start {
        headers.remove(&COLD_START);
    }
    if cold {
        headers.insert(COLD_START.clone(), HeaderValue::from_static("true"));
    }
    guard.upstream = Some(upstream);
    Ok(resp.map(|body| ProxyBody::upstream(body, guard)))
}

/// Retries of a request on fresh connections after pooled ones turned out closed.
const MAX_STALE_RETRIES: u32 = 3;
/// First pause before connecting again to a woken replica that refused (it does not
/// listen yet); it doubles up to [`REFUSED_PAUSE_MAX`].
const REFUSED_PAUSE_FIRST: Duration = Duration::from_millis(2);
/// Longest pause between connects to a woken replica that refuses.
const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(25);

/// Whether a request may be sent again after a replica failed it or answered 5xx: an
/// idempotent method (RFC 9110 9.2.2) and no body to send, so a copy of its head is the
/// whole request.
fn replayable(req: &Request<UpstreamBody>) -> bool {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    idempotent && req.body().is_end_stream()
}

/// A copy of a request whose body is empty (see [`replayable`]).
fn copy_request(req: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(UpstreamBody::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// What one pass over a message's header names finds: most messages carry no hop-by-hop,
/// `X-Zeroscale-*` or `X-Forwarded-*` header, and then no removal or replacement (a hash
/// lookup each) is needed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeaderScan {
    hop_by_hop: bool,
    connection: bool,
    ours: bool,
    cold_start: bool,
    forwarded: bool,
}

impl HeaderScan {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut scan = Self::default();
        for name in headers.keys() {
            scan.add(name);
        }
        scan
    }

    fn add(&mut self, name: &HeaderName) {
        if is_hop_by_hop(name) {
            self.hop_by_hop = true;
            self.connection |= name == header::CONNECTION;
        } else if let Some(rest) = name.as_str().strip_prefix("x-") {
            if rest.starts_with(&ZEROSCALE_PREFIX[2..]) {
                self.ours = true;
                self.cold_start |= name == COLD_START;
            } else if rest.starts_with(&FORWARDED_PREFIX[2..]) {
                self.forwarded = true;
            }
        }
    }
}

/// What the proxy reads of a request's headers, in one pass over them instead of a hash
/// lookup for each header it needs.
pub(crate) struct RequestHead {
    scan: HeaderScan,
    /// The first `Host` value.
    host: Option<HeaderValue>,
    /// The first `Content-Length` value, when it is a number.
    content_length: Option<u64>,
}

impl RequestHead {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let mut scan = HeaderScan::default();
        let mut host = None;
        let mut content_length = None;
        let mut length_seen = false;
        for (name, value) in headers {
            if name == header::HOST {
                if host.is_none() {
                    host = Some(value.clone());
                }
            } else if name == header::CONTENT_LENGTH {
                if !length_seen {
                    length_seen = true;
                    content_length = value.to_str().ok().and_then(|v| v.parse().ok());
                }
            } else {
                scan.add(name);
            }
        }
        Self {
            scan,
            host,
            content_length,
        }
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

fn is_body_too_large(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if matches!(err.downcast_ref::<BodyError>(), Some(BodyError::TooLarge)) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade`).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1): `Connection` and every header it names,
/// and the fixed list. On an upgrade, `Connection: upgrade` and `Upgrade` stay.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    if let Some(listed) = connection_listed(headers) {
        for name in listed {
            headers.remove(&name);
        }
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
}

/// The header names listed in `Connection`, if any (allocates only when there are).
fn connection_listed(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',') {
            let t = t.trim();
            if t.eq_ignore_ascii_case("close") || t.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
                out.push(name);
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Makes a client's request head fit to send on: hop-by-hop and `X-Zeroscale-*` headers
/// removed, `X-Forwarded-*` set (the client's own kept only behind a trusted proxy),
/// `Host` present (`fallback_host` when the client sent none). `scan` and `original_host`
/// are the [`RequestHead`] of these headers.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    scan: HeaderScan,
    original_host: Option<HeaderValue>,
    conn: &ConnInfo,
    fallback_host: Option<HeaderValue>,
    upgrade: Option<HeaderValue>,
) {
    if scan.hop_by_hop {
        strip_hop_by_hop(headers, false);
    }
    if scan.ours {
        let ours: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with(ZEROSCALE_PREFIX))
            .cloned()
            .collect();
        for k in ours {
            headers.remove(&k);
        }
    }

    let had_host = original_host.is_some();
    let host_value = original_host.or(fallback_host);
    if !scan.forwarded {
        // None to extend or replace (trusted or not, the outcome is the same): appends,
        // which skip an insert's search for earlier values.
        headers.append(X_FORWARDED_FOR.clone(), conn.peer_ip.clone());
        headers.append(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        if let Some(h) = &host_value {
            headers.append(X_FORWARDED_HOST.clone(), h.clone());
        }
    } else if conn.trusted {
        let prior: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let xff = if prior.is_empty() {
            conn.peer_ip.clone()
        } else {
            let mut joined = prior.join(&b", "[..]);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(conn.peer_ip.as_bytes());
            HeaderValue::from_bytes(&joined).unwrap_or_else(|_| conn.peer_ip.clone())
        };
        headers.insert(X_FORWARDED_FOR.clone(), xff);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if !headers.contains_key(&X_FORWARDED_HOST)
            && let Some(h) = &host_value
        {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), conn.peer_ip.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        match &host_value {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
    if !had_host && let Some(h) = host_value {
        headers.insert(header::HOST, h);
    }
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
}

/// One request's presence in the activator's counters: from arrival to the end of its
/// response body (or of its upgraded connection), with its replica slot once admitted.
pub(crate) struct RequestGuard {
    fs: Arc<FunctionState>,
    start: Instant,
    /// `start` in the Function's counters' terms.
    arrived: u64,
    lease: Option<Lease>,
    /// Replicas have a concurrency cap: a freed slot may let a queued request go.
    capped: bool,
    /// The connection the response arrives on; back to the pool once it is read.
    upstream: Option<pool::Conn>,
    /// The response was read to the end, so its connection can be reused.
    completed: bool,
    idle_timeout: std::time::Duration,
    /// Its duration goes into the Function's histogram (not for a request the fast
    /// lane gave up before sending, which the full path then counts).
    observed: bool,
}

impl RequestGuard {
    pub(crate) fn arrive(
        fs: Arc<FunctionState>,
        traffic: &Traffic,
        capped: bool,
        idle_timeout: std::time::Duration,
    ) -> Self {
        let start = Instant::now();
        let arrived = traffic.counters.arrive(start);
        Self {
            fs,
            start,
            arrived,
            lease: None,
            capped,
            upstream: None,
            completed: false,
            idle_timeout,
            observed: true,
        }
    }

    /// When the request arrived.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// The request is given up before it was sent, and served again from the start:
    /// its presence so far counts, its arrival and its duration are counted there.
    pub(crate) fn abandon(mut self) {
        self.observed = false;
        if let Some(t) = self.traffic() {
            t.counters.recount();
        }
    }

    fn traffic(&self) -> Option<&Traffic> {
        self.fs.traffic_if_any()
    }

    pub(crate) fn admitted(&mut self, lease: Lease) {
        if let Some(t) = self.traffic() {
            t.counters
                .in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.lease = Some(lease);
    }

    /// Gives the replica slot back, and at `now` the connection if its response was read
    /// to the end.
    fn release(&mut self, now: Instant) {
        if let Some(lease) = self.lease.take() {
            if let Some(conn) = self.upstream.take()
                && self.completed
            {
                lease.replica().idle.checkin(conn, now, self.idle_timeout);
            }
            drop(lease);
            if let Some(t) = self.traffic() {
                t.counters
                    .in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                // Room on a capped replica: let one queued request look.
                if self.capped {
                    t.changed.notify_one();
                }
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // One clock read for everything the end of a request updates.
        let now = Instant::now();
        self.release(now);
        if let Some(t) = self.traffic() {
            let present = t.counters.depart(now, self.arrived);
            if self.observed {
                t.metrics.duration.observe(present.as_secs_f64());
            }
        }
    }
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("request body too large")]
    TooLarge,
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
}

/// The client's body with a size limit enforced as it streams (chunked bodies too).
pub(crate) struct LimitedBody {
    inner: Incoming,
    remaining: u64,
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    self.remaining -= len;
                }
                Some(Ok(frame))
            }
            Some(Err(e)) => Some(Err(BodyError::Client(e))),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body as the proxy takes it: streamed from hyper, or already read
/// whole (the fast lane's requests, see `lane`).
pub(crate) trait RequestBody: Send + 'static {
    fn into_upstream(self, limit: u64) -> UpstreamBody;
}

impl RequestBody for Incoming {
    fn into_upstream(self, limit: u64) -> UpstreamBody {
        if self.is_end_stream() {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Streamed(LimitedBody {
                inner: self,
                remaining: limit,
            })
        }
    }
}

/// A body read whole, within the limit already.
impl RequestBody for Bytes {
    fn into_upstream(self, _limit: u64) -> UpstreamBody {
        if self.is_empty() {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Whole(Some(self))
        }
    }
}

/// The request body as sent to a replica.
pub(crate) enum UpstreamBody {
    /// Nothing to send.
    Empty,
    Streamed(LimitedBody),
    /// Sent in one frame.
    Whole(Option<Bytes>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut *self {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Streamed(b) => b.is_end_stream(),
            UpstreamBody::Whole(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Streamed(b) => b.size_hint(),
            UpstreamBody::Whole(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// What the activator answers with: its own short bodies, or a replica's response body
/// streamed through, holding the request's accounting until it ends.
pub(crate) enum ProxyBody {
    Full(Full<Bytes>),
    Empty,
    Upstream {
        body: Incoming,
        guard: Option<RequestGuard>,
    },
}

impl ProxyBody {
    pub(crate) fn full(body: Full<Bytes>) -> Self {
        Self::Full(body)
    }
    fn empty() -> Self {
        Self::Empty
    }
    #[cfg(test)]
    pub(crate) fn empty_for_test() -> Self {
        Self::Empty
    }
    fn upstream(body: Incoming, mut guard: RequestGuard) -> Self {
        guard.completed = body.is_end_stream();
        Self::Upstream {
            body,
            guard: Some(guard),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let ProxyBody::Upstream {
            body,
            guard: Some(g),
        } = self
        {
            g.completed = body.is_end_stream();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut *self {
            ProxyBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Upstream { body, guard } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &frame {
                    // Read to the end (hyper may not poll again after a body of known
                    // length): the connection can take the next request.
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    Some(Ok(_)) | None => {
                        if let Some(mut g) = guard.take() {
                            g.completed = true;
                        }
                    }
                    // Broken: the request is over now, not when hyper drops us.
                    Some(Err(_)) => drop(guard.take()),
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Empty => true,
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn untrusted_peer_cannot_spoof_forwarding_headers() {
        let conn = ConnInfo::for_test("192.0.2.7".parse().unwrap(), false);
        let mut h = headers(&[
            ("host", "f.ns"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-zeroscale-cold-start", "true"),
        ]);
        let head = RequestHead::of(&h);
        prepare_request_headers(&mut h, head.scan, head.host, &conn, None, None);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "f.ns");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-zeroscale-cold-start"));
    }

    #[test]
    fn trusted_proxy_chain_is_extended() {
        let conn = ConnInfo::for_test("10.0.0.9".parse().unwrap(), true);
        let mut h = headers(&[
            ("host", "f.ns"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let head = RequestHead::of(&h);
        prepare_request_headers(&mut h, head.scan, head.host, &conn, None, None);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "f.ns");
    }

    #[test]
    fn a_trusted_proxy_without_forwarding_headers_gets_fresh_ones() {
        let conn = ConnInfo::for_test("10.0.0.9".parse().unwrap(), true);
        let mut h = headers(&[("host", "f.ns"), ("x-other", "1")]);
        let head = RequestHead::of(&h);
        prepare_request_headers(&mut h, head.scan, head.host, &conn, None, None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "f.ns");
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn one_spoofed_forwarding_header_is_enough_to_replace_them_all() {
        let conn = ConnInfo::for_test("192.0.2.7".parse().unwrap(), false);
        let mut h = headers(&[("host", "f.ns"), ("x-forwarded-proto", "https")]);
        let head = RequestHead::of(&h);
        prepare_request_headers(&mut h, head.scan, head.host, &conn, None, None);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
    }

    #[test]
    fn the_first_host_and_content_length_are_read() {
        let h = headers(&[
            ("host", "a.ns"),
            ("content-length", "12"),
            ("host", "b.ns"),
            ("x-forwarded-for", "1.2.3.4"),
        ]);
        let head = RequestHead::of(&h);
        assert_eq!(head.host.unwrap(), "a.ns");
        assert_eq!(head.content_length, Some(12));
        assert!(head.scan.forwarded);
    }

    #[test]
    fn upgrade_headers_survive_on_upgrades() {
        let conn = ConnInfo::for_test("192.0.2.7".parse().unwrap(), false);
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let head = RequestHead::of(&h);
        prepare_request_headers(
            &mut h,
            head.scan,
            head.host,
            &conn,
            Some(HeaderValue::from_static("f.ns")),
            Some(HeaderValue::from_static("websocket")),
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["host"], "f.ns");
    }
}
