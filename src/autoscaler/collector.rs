//! Reading the activators' stats and turning them into per-Function load.
//!
//! [`HttpSource`] finds the ready activator pods from the EndpointSlices of the activator
//! Service (a watch, port `admin`) and reads `/stats` from all of them at once with a
//! short timeout. [`Aggregator`] differences each activator's cumulative counters into
//! per-interval rates, keeps a slow or gone activator's last values (marked stale) for a
//! few seconds, and sums everything per Function.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::decider::Load;
use super::{Reading, StatsSource};
use crate::api::FunctionKey;
use crate::stats::{FunctionStats, StatsSnapshot};

/// The port name of the activators' admin endpoint (serves `/stats`).
pub const ADMIN_PORT_NAME: &str = "admin";
/// Largest `/stats` body accepted.
const MAX_STATS_BYTES: usize = 16 * 1024 * 1024;

/// Reads `/stats` from each ready endpoint of the activator Service (port `admin`).
pub struct HttpSource {
    client: kube::Client,
    namespace: String,
    service: String,
    timeout: Duration,
    http: Client<HttpConnector, Empty<Bytes>>,
    endpoints: Arc<Mutex<BTreeMap<String, Vec<SocketAddr>>>>,
    /// Stops the EndpointSlice watch when the source is dropped; set on first use so
    /// `new` needs no runtime.
    watch: Mutex<Option<DropGuard>>,
}

impl HttpSource {
    /// Reads the activators behind `service` in `namespace`, 500ms timeout per read.
    pub fn new(client: kube::Client, namespace: String, service: String) -> Self {
        Self::with_timeout(client, namespace, service, Duration::from_millis(500))
    }

    /// Like [`HttpSource::new`] with another per-read timeout.
    pub fn with_timeout(
        client: kube::Client,
        namespace: String,
        service: String,
        timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            namespace,
            service,
            timeout,
            http,
            endpoints: Arc::default(),
            watch: Mutex::new(None),
        }
    }

    fn ensure_watching(&self) {
        let mut watch = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        if watch.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        *watch = Some(stop.clone().drop_guard());
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", self.service));
        let endpoints = self.endpoints.clone();
        let service = self.service.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut relist: Option<BTreeMap<String, Vec<SocketAddr>>> = None;
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.try_next() => e,
                };
                let set = |name: String, addrs: Option<Vec<SocketAddr>>| {
                    let mut map = endpoints.lock().unwrap_or_else(PoisonError::into_inner);
                    match addrs {
                        Some(a) => map.insert(name, a),
                        None => map.remove(&name),
                    };
                };
                match event {
                    Ok(Some(watcher::Event::Init)) => relist = Some(BTreeMap::new()),
                    Ok(Some(watcher::Event::InitApply(slice))) => {
                        if let Some(r) = relist.as_mut() {
                            r.insert(slice_name(&slice), admin_addresses(&slice));
                        }
                    }
                    Ok(Some(watcher::Event::InitDone)) => {
                        let fresh = relist.take().unwrap_or_default();
                        let count: usize = fresh.values().map(Vec::len).sum();
                        info!(%service, activators = count, "activator endpoints listed");
                        *endpoints.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
                    }
                    Ok(Some(watcher::Event::Apply(slice))) => {
                        set(slice_name(&slice), Some(admin_addresses(&slice)))
                    }
                    Ok(Some(watcher::Event::Delete(slice))) => set(slice_name(&slice), None),
                    Ok(None) => return,
                    Err(e) => warn!(%service, error = %e, "watching activator EndpointSlices"),
                }
            }
        });
    }

    async fn read(&self, addr: SocketAddr) -> Result<StatsSnapshot, String> {
        let uri = format!("http://{addr}/stats");
        let request = http::Request::get(&uri)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| format!("GET {uri}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET {uri}: status {}", response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_STATS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading {uri}: {e}"))?
                .to_bytes();
            serde_json::from_slice::<StatsSnapshot>(&body).map_err(|e| format!("decoding {uri}: {e}"))
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(result) => result,
            Err(_) => Err(format!("GET {uri}: no answer within {:?}", self.timeout)),
        }
    }
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// The `admin` address of every ready endpoint of a slice.
pub fn admin_addresses(slice: &EndpointSlice) -> Vec<SocketAddr> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        // `ready` unset means ready (the API's documented reading of an unknown state).
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.addresses.first())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

#[async_trait]
impl StatsSource for HttpSource {
    async fn collect(&self) -> Vec<Reading> {
        self.ensure_watching();
        let addrs: BTreeSet<SocketAddr> = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flatten()
            .copied()
            .collect();
        futures::future::join_all(addrs.into_iter().map(|addr| async move {
            Reading {
                source: addr.to_string(),
                result: self.read(addr).await,
            }
        }))
        .await
    }
}

/// One activator's last read and the load derived from it.
#[derive(Debug, Clone)]
struct SourceState {
    activator: String,
    /// When the last snapshot was received (autoscaler clock).
    received: Instant,
    snapshot: StatsSnapshot,
    /// Per Function: (average concurrency, rps) over the interval before the last read;
    /// absent when the last read was a fresh baseline.
    rates: BTreeMap<FunctionKey, (f64, f64)>,
}

/// Per-Function load of one collection round.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub functions: BTreeMap<FunctionKey, Load>,
    /// Unix ms of the last request per Function, over all activators.
    pub last_request_unix_ms: BTreeMap<FunctionKey, i64>,
    /// Some activator did not answer, answered late, or restarted: loads may be low.
    pub partial: bool,
    /// Activators read this round.
    pub fresh: usize,
    /// Activators whose last values were used instead.
    pub stale: usize,
}

impl Round {
    /// The load of one Function (nothing known: zero load, partial as the round).
    pub fn load(&self, key: &FunctionKey) -> Load {
        self.functions.get(key).cloned().unwrap_or_else(|| Load {
            partial: self.partial,
            ..Load::default()
        })
    }
}

/// Turns successive rounds of readings into per-Function load.
#[derive(Debug)]
pub struct Aggregator {
    stale_after: Duration,
    sources: BTreeMap<String, SourceState>,
}

impl Aggregator {
    /// Keeps an unanswering activator's last values for `stale_after`, then drops it.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            sources: BTreeMap::new(),
        }
    }

    /// Takes this round's readings and returns the summed load.
    pub fn observe(&mut self, readings: Vec<Reading>, now: Instant) -> Round {
        let mut round = Round::default();
        let mut answered = BTreeSet::new();
        // New requests per Function from this round's reads only.
        let mut new_requests: BTreeMap<FunctionKey, u64> = BTreeMap::new();
        for reading in readings {
            let snapshot = match reading.result {
                Ok(s) => s,
                Err(error) => {
                    debug!(source = %reading.source, %error, "activator stats unavailable");
                    round.partial = true;
                    continue;
                }
            };
            let previous = self.sources.get(&reading.source);
            let continues = previous.filter(|p| {
                p.activator == snapshot.activator
                    && snapshot.taken_unix_ms >= p.snapshot.taken_unix_ms
            });
            if let Some(p) = continues
                && snapshot.taken_unix_ms == p.snapshot.taken_unix_ms
            {
                // The same snapshot again: no new information, treat as unanswered.
                round.partial = true;
                continue;
            }
            let rates = match continues {
                Some(p) => match differences(&p.snapshot, &snapshot) {
                    Some(d) => {
                        for (key, n) in d.new_requests {
                            *new_requests.entry(key).or_default() += n;
                        }
                        d.rates
                    }
                    None => {
                        info!(source = %reading.source, activator = %snapshot.activator, "activator counters went back: restarted, new baseline");
                        round.partial = true;
                        BTreeMap::new()
                    }
                },
                None => {
                    if previous.is_some() {
                        info!(source = %reading.source, activator = %snapshot.activator, "activator restarted, new baseline");
                    }
                    round.partial = true;
                    BTreeMap::new()
                }
            };
            answered.insert(reading.source.clone());
            self.sources.insert(
                reading.source,
                SourceState {
                    activator: snapshot.activator.clone(),
                    received: now,
                    snapshot,
                    rates,
                },
            );
        }

        // Unanswered sources: last values for a while, then forgotten.
        let stale_after = self.stale_after;
        self.sources.retain(|source, state| {
            if answered.contains(source) {
                return true;
            }
            let keep = now.saturating_duration_since(state.received) <= stale_after;
            if !keep {
                warn!(%source, activator = %state.activator, "activator stats stale too long, dropped");
            }
            keep
        });

        for (source, state) in &self.sources {
            let fresh = answered.contains(source);
            if fresh {
                round.fresh += 1;
            } else {
                round.stale += 1;
                round.partial = true;
            }
            for f in &state.snapshot.functions {
                let key = f.key();
                let load = round.functions.entry(key.clone()).or_default();
                match state.rates.get(&key) {
                    Some(&(concurrency, rps)) => {
                        load.concurrency += concurrency;
                        load.rps += rps;
                    }
                    // A baseline: the instantaneous count is the best estimate.
                    None => load.concurrency += (f.in_flight + f.queued) as f64,
                }
                load.in_flight += f.in_flight;
                load.queued += f.queued;
                if let Some(ms) = f.last_request_unix_ms {
                    let last = round.last_request_unix_ms.entry(key).or_insert(ms);
                    *last = (*last).max(ms);
                }
            }
        }
        for (key, n) in new_requests {
            round.functions.entry(key).or_default().new_requests = n;
        }
        let partial = round.partial;
        for load in round.functions.values_mut() {
            load.partial = partial;
        }
        round
    }
}

struct Differences {
    rates: BTreeMap<FunctionKey, (f64, f64)>,
    new_requests: BTreeMap<FunctionKey, u64>,
}

/// Rates between two snapshots of the same activator; `None` when a counter went back
/// (the activator restarted under the same name).
fn differences(before: &StatsSnapshot, after: &StatsSnapshot) -> Option<Differences> {
    let seconds = (after.taken_unix_ms - before.taken_unix_ms) as f64 / 1000.0;
    let old = before.by_function();
    let zero = FunctionStats::default();
    let mut out = Differences {
        rates: BTreeMap::new(),
        new_requests: BTreeMap::new(),
    };
    for f in &after.functions {
        let key = f.key();
        // A Function new to this activator started from zero counters.
        let o = old.get(&key).copied().unwrap_or(&zero);
        let requests = f.requests_total.checked_sub(o.requests_total)?;
        let integral = f.concurrency_seconds_total - o.concurrency_seconds_total;
        if integral < -1e-6 {
            return None;
        }
        let concurrency = if seconds > 0.0 { integral.max(0.0) / seconds } else { 0.0 };
        let rps = if seconds > 0.0 { requests as f64 / seconds } else { 0.0 };
        out.rates.insert(key.clone(), (concurrency, rps));
        if requests > 0 {
            out.new_requests.insert(key, requests);
        }
    }
    Some(out)
}
