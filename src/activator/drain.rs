//! Draining replicas before their pods stop: the activators' half of the drain hook the
//! operator gives every Function's serving container (see `operator::build`).
//!
//! When a pod is deleted (scale-down, rollout, the Function deleted, a node drained), the
//! kubelet runs its `preStop` before it sends SIGTERM. zeroscale's `preStop` is an HTTP
//! GET to the activator Service's ClusterIP, path `/.zeroscale/drain/<ns>/<name>`. The
//! activator that receives it:
//!
//! 1. reads from the platform which of the Function's replicas are stopping (pods with a
//!    deletion timestamp, a fresh read: the kubelet only calls the hook after the
//!    deletion began, so the caller is among them; no identity needs to travel in the
//!    request, which a kubelet could not vary per pod);
//! 2. asks every activator (itself included, through the same admin endpoint
//!    `/drain-status`) whether it still routes new requests to any of those addresses
//!    and how many of its requests are in flight to them;
//! 3. answers once every activator routes nothing there and has nothing in flight, so
//!    the app gets SIGTERM with no request of ours on it, whatever it does on SIGTERM.
//!
//! The wait is bounded by the Function's `timeouts.request` (the operator sets the
//! grace period to cover it) plus a margin; the kubelet bounds it by the grace period
//! anyway. An activator that cannot be asked for a few seconds is left out: an activator
//! that is gone holds no requests. The request must come with a Host that no Function
//! can have (an IP address, which is what the kubelet sends for an IP `host`), so the
//! drain path never shadows a Function's own path.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Activator;
use super::proxy::ProxyBody;
use super::routing::DrainStatus;
use crate::api::{DRAIN_PATH_PREFIX, FunctionKey};

/// How often a drain asks the activators again.
const POLL: Duration = Duration::from_millis(100);
/// How long a drain waits beyond `timeouts.request`.
const MARGIN: Duration = Duration::from_secs(5);
/// How long an activator may fail to answer before a drain goes on without it.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);
/// Per-question timeout.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the other activators answer `/drain-status` (their admin addresses).
pub trait DrainPeers: Send + Sync {
    /// Every ready activator's admin address, this one's included; `None` until known.
    fn addresses(&self) -> Option<BTreeSet<SocketAddr>>;
}

impl DrainPeers for crate::platform::directory::ActivatorDirectory {
    fn addresses(&self) -> Option<BTreeSet<SocketAddr>> {
        crate::platform::directory::ActivatorDirectory::addresses(self)
    }
}

/// The Function a drain request is for: `host` must be an IP address (no Function has
/// one) and `path` `/.zeroscale/drain/<namespace>/<name>`.
pub(crate) fn drain_request(host: &str, path: &str) -> Option<FunctionKey> {
    let bare = host
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or(host);
    let ip_host = bare.parse::<IpAddr>().is_ok()
        || host
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.parse::<IpAddr>().is_ok());
    if !ip_host {
        return None;
    }
    let rest = path.strip_prefix(DRAIN_PATH_PREFIX)?;
    let (namespace, name) = rest.split_once('/')?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    (valid(namespace) && valid(name)).then(|| FunctionKey::new(namespace, name))
}

/// The `/drain-status?ips=a,b` admin route: this activator's part of a drain.
pub(crate) fn status_route(act: &Activator, path: &str) -> Option<Response<Full<Bytes>>> {
    let query = path.strip_prefix("/drain-status")?;
    let ips: Vec<IpAddr> = query
        .strip_prefix("?ips=")
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let status = act.table().drain_status(&ips);
    let body = serde_json::to_vec(&status).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Some(resp)
}

/// What one round of asking found.
#[derive(Debug, Default)]
struct Round {
    done: bool,
    waiting_on: Vec<String>,
}

/// Serves a drain request: waits until no activator routes to, or has a request in
/// flight to, a stopping replica of `key` (or the wait's bound passes), then answers 200.
pub(crate) async fn serve(act: &Arc<Activator>, key: FunctionKey) -> Response<ProxyBody> {
    let started = Instant::now();
    let bound = act
        .table()
        .lookup(&format!("{}.{}", key.name, key.namespace))
        .map(|fs| fs.conf().request)
        .unwrap_or_else(|| default_request_timeout(act))
        + MARGIN;
    let stopping = match act.platform.stopping_replicas(&key).await {
        Ok(ips) => ips,
        Err(e) => {
            // Without the list, wait for what is in flight to replicas that have left
            // the ready sets: every stopping replica leaves them.
            warn!(function = %key, error = %e, "reading the stopping replicas failed");
            Vec::new()
        }
    };
    if stopping.is_empty() {
        debug!(function = %key, "drain: no stopping replica");
        return answer("nothing to drain");
    }
    let client = peer_client();
    let mut failing_since: std::collections::HashMap<SocketAddr, Instant> = Default::default();
    let mut last = Round::default();
    while started.elapsed() < bound {
        last = ask(act, &client, &stopping, &mut failing_since).await;
        if last.done {
            info!(function = %key, replicas = ?stopping, waited = ?started.elapsed(), "drained");
            return answer("drained");
        }
        tokio::time::sleep(POLL).await;
    }
    warn!(function = %key, replicas = ?stopping, waiting_on = ?last.waiting_on, "drain gave up after {bound:?}");
    answer("drain timed out")
}

async fn ask(
    act: &Arc<Activator>,
    client: &Client<HttpConnector, Empty<Bytes>>,
    ips: &[IpAddr],
    failing_since: &mut std::collections::HashMap<SocketAddr, Instant>,
) -> Round {
    let peers = act.peers.get().and_then(|p| p.addresses());
    let Some(peers) = peers.filter(|p| !p.is_empty()) else {
        // No directory (a single activator, `dev`, tests): this one's view is the view.
        let status = act.table().drain_status(ips);
        return Round {
            done: status.done(),
            waiting_on: (!status.done())
                .then(|| format!("self: {status:?}"))
                .into_iter()
                .collect(),
        };
    };
    let query: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    let query = query.join(",");
    let answers = futures::future::join_all(peers.iter().map(|peer| {
        let query = &query;
        async move { (*peer, ask_one(client, *peer, query).await) }
    }))
    .await;
    let now = Instant::now();
    let mut round = Round {
        done: true,
        waiting_on: Vec::new(),
    };
    for (peer, answer) in answers {
        match answer {
            Ok(status) => {
                failing_since.remove(&peer);
                if !status.done() {
                    round.done = false;
                    round.waiting_on.push(format!("{peer}: {status:?}"));
                }
            }
            Err(e) => {
                let since = *failing_since.entry(peer).or_insert(now);
                if now.saturating_duration_since(since) < UNREACHABLE_GRACE {
                    round.done = false;
                    round.waiting_on.push(format!("{peer}: {e}"));
                }
            }
        }
    }
    round
}

async fn ask_one(
    client: &Client<HttpConnector, Empty<Bytes>>,
    peer: SocketAddr,
    query: &str,
) -> Result<DrainStatus, String> {
    let uri = format!("http://{peer}/drain-status?ips={query}");
    let request = http::Request::get(&uri)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {uri}: status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading {uri}: {e}"))?
            .to_bytes();
        serde_json::from_slice::<DrainStatus>(&body).map_err(|e| format!("decoding {uri}: {e}"))
    };
    tokio::time::timeout(ASK_TIMEOUT, fetch)
        .await
        .unwrap_or_else(|_| Err(format!("GET {uri}: no answer within {ASK_TIMEOUT:?}")))
}

/// `timeouts.request` of a Function this activator no longer knows (deleted).
fn default_request_timeout(act: &Activator) -> Duration {
    act.settings
        .defaults
        .timeouts
        .request
        .as_deref()
        .and_then(|s| crate::api::duration::parse_duration(s).ok())
        .unwrap_or(Duration::from_secs(300))
}

fn peer_client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(ASK_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

fn answer(what: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Full::new(Bytes::from_static(
        what.as_bytes(),
    ))));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_hosts_and_the_drain_path_are_drain_requests() {
        let key = FunctionKey::new("team-a", "hello");
        for host in ["10.96.0.20", "10.96.0.20:80", "[fd00::1]:80", "fd00::1"] {
            assert_eq!(
                drain_request(host, "/.zeroscale/drain/team-a/hello"),
                Some(key.clone()),
                "{host}"
            );
        }
        // A Function's own host never drains, whatever the path.
        assert_eq!(
            drain_request("hello.team-a", "/.zeroscale/drain/team-a/hello"),
            None
        );
        for path in [
            "/.zeroscale/drain/team-a",
            "/.zeroscale/drain//hello",
            "/.zeroscale/drain/team-a/hello/x",
            "/.zeroscale/drain/Team/hello",
            "/other",
        ] {
            assert_eq!(drain_request("10.96.0.20", path), None, "{path}");
        }
    }
}
