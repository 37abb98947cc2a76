//! Reading the activators' stats and turning them into per-Function load.
//!
//! [`HttpSource`] finds the ready activator pods from the EndpointSlices of the activator
//! Service (a watch, port `admin`) and reads `/stats` from all of them at once with a
//! short timeout. [`Aggregator`] differences each activator's cumulative counters into
//! per-interval rates, keeps a slow or gone activator's last values (marked stale) for a
//! few seconds, and sums everything per Function.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::decider::Load;
use super::{Reading, StatsSource};
use crate::api::FunctionKey;
use crate::stats::{FunctionStats, StatsSnapshot};

use crate::platform::directory::ActivatorDirectory;
pub use crate::platform::directory::{ADMIN_PORT_NAME, admin_addresses};

/// Largest `/stats` body accepted.
const MAX_STATS_BYTES: usize = 16 * 1024 * 1024;

/// Reads `/stats` from each ready endpoint of the activator Service (port `admin`).
pub struct HttpSource {
    directory: ActivatorDirectory,
    timeout: Duration,
    http: Client<HttpConnector, Empty<Bytes>>,
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
            directory: ActivatorDirectory::new(client, namespace, service),
            timeout,
            http,
        }
    }

    /// Where the activators are.
    pub fn directory(&self) -> &ActivatorDirectory {
        &self.directory
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
            serde_json::from_slice::<StatsSnapshot>(&body)
                .map_err(|e| format!("decoding {uri}: {e}"))
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(result) => result,
            Err(_) => Err(format!("GET {uri}: no answer within {:?}", self.timeout)),
        }
    }
}

#[async_trait]
impl StatsSource for HttpSource {
    async fn collect(&self) -> Vec<Reading> {
        let Some(addrs) = self.directory.addresses() else {
            // Not listed yet: say so, so that no activator reads as no load.
            return vec![Reading {
                source: format!("endpointslices/{}", self.directory.service()),
                result: Err("activator endpoints not listed yet".into()),
            }];
        };
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
    /// Per Function: requests received between the last two reads.
    new_requests: BTreeMap<FunctionKey, u64>,
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
    /// Reads that failed this round (an activator that keeps failing counts here even
    /// after its last values are dropped, and keeps the round partial).
    pub failed: usize,
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
        for reading in readings {
            let snapshot = match reading.result {
                Ok(s) => s,
                Err(error) => {
                    debug!(source = %reading.source, %error, "activator stats unavailable");
                    round.partial = true;
                    round.failed += 1;
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
            let (rates, new_requests) = match continues {
                Some(p) => match differences(&p.snapshot, &snapshot) {
                    Some(d) => (d.rates, d.new_requests),
                    None => {
                        info!(source = %reading.source, activator = %snapshot.activator, "activator counters went back: restarted, new baseline");
                        round.partial = true;
                        (BTreeMap::new(), BTreeMap::new())
                    }
                },
                None => {
                    if previous.is_some() {
                        info!(source = %reading.source, activator = %snapshot.activator, "activator restarted, new baseline");
                    }
                    round.partial = true;
                    (BTreeMap::new(), BTreeMap::new())
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
                    new_requests,
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

        // One activator can be reachable at several addresses (dual-stack slices): count
        // each activator id once, preferring a fresh read.
        let mut counted = BTreeSet::new();
        let (fresh_first, stale_after_them): (Vec<_>, Vec<_>) = self
            .sources
            .iter()
            .partition(|(source, _)| answered.contains(*source));
        for (source, state) in fresh_first.into_iter().chain(stale_after_them) {
            if !counted.insert(state.activator.as_str()) {
                debug!(%source, activator = %state.activator, "activator read at another address too, counted once");
                continue;
            }
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
                if fresh {
                    load.new_requests += state.new_requests.get(&key).copied().unwrap_or(0);
                }
                if let Some(ms) = f.last_request_unix_ms {
                    let last = round.last_request_unix_ms.entry(key).or_insert(ms);
                    *last = (*last).max(ms);
                }
            }
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
        let concurrency = if seconds > 0.0 {
            integral.max(0.0) / seconds
        } else {
            0.0
        };
        let rps = if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        };
        out.rates.insert(key.clone(), (concurrency, rps));
        if requests > 0 {
            out.new_requests.insert(key, requests);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::ScaleConfig;
    use crate::autoscaler::decider::{Decider, Observation};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn key() -> FunctionKey {
        FunctionKey::new("default", "hello")
    }

    /// An activator's snapshot with one Function's cumulative counters.
    fn snap(
        activator: &str,
        at_ms: i64,
        requests: u64,
        integral: f64,
        in_flight: u64,
    ) -> StatsSnapshot {
        StatsSnapshot {
            activator: activator.into(),
            taken_unix_ms: at_ms,
            functions: vec![FunctionStats {
                namespace: "default".into(),
                name: "hello".into(),
                in_flight,
                queued: 0,
                requests_total: requests,
                concurrency_seconds_total: integral,
                last_request_unix_ms: (requests > 0).then_some(at_ms),
            }],
        }
    }

    fn ok(source: &str, s: StatsSnapshot) -> Reading {
        Reading {
            source: source.into(),
            result: Ok(s),
        }
    }

    fn failed(source: &str) -> Reading {
        Reading {
            source: source.into(),
            result: Err("timed out".into()),
        }
    }

    /// Activator `id` at second `t` of a steady `c` in flight and `rps` requests/s.
    fn steady(id: &str, t: i64, c: f64, rps: u64) -> StatsSnapshot {
        snap(id, t * 1000, rps * t as u64, c * t as f64, c as u64)
    }

    #[test]
    fn sums_rates_across_activators() {
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let t0 = Instant::now();
        agg.observe(
            vec![
                ok("a", steady("a", 0, 4.0, 40)),
                ok("b", steady("b", 0, 6.0, 60)),
            ],
            t0,
        );
        let round = agg.observe(
            vec![
                ok("a", steady("a", 1, 4.0, 40)),
                ok("b", steady("b", 1, 6.0, 60)),
            ],
            t0 + Duration::from_secs(1),
        );
        let load = round.load(&key());
        assert!(!round.partial);
        assert!((load.concurrency - 10.0).abs() < 1e-9, "{load:?}");
        assert!((load.rps - 100.0).abs() < 1e-9, "{load:?}");
        assert_eq!(load.in_flight, 10);
        assert_eq!(load.new_requests, 100);
    }

    #[test]
    fn a_slow_activator_keeps_its_last_rate_and_is_not_counted_twice_when_back() {
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        agg.observe(
            vec![
                ok("a", steady("a", 0, 4.0, 40)),
                ok("b", steady("b", 0, 6.0, 60)),
            ],
            at(0),
        );
        agg.observe(
            vec![
                ok("a", steady("a", 1, 4.0, 40)),
                ok("b", steady("b", 1, 6.0, 60)),
            ],
            at(1),
        );
        // b misses three rounds: its last rate stands in, marked partial.
        for s in 2..5 {
            let round = agg.observe(
                vec![ok("a", steady("a", s as i64, 4.0, 40)), failed("b")],
                at(s),
            );
            let load = round.load(&key());
            assert!(round.partial && load.partial);
            assert_eq!((round.fresh, round.stale), (1, 1));
            assert!((load.concurrency - 10.0).abs() < 1e-9, "{load:?}");
            assert_eq!(load.new_requests, 40, "only a's new requests");
        }
        // b answers again: its counters cover four seconds, averaged over them, once.
        let round = agg.observe(
            vec![
                ok("a", steady("a", 5, 4.0, 40)),
                ok("b", steady("b", 5, 6.0, 60)),
            ],
            at(5),
        );
        let load = round.load(&key());
        assert!(!round.partial);
        assert!((load.concurrency - 10.0).abs() < 1e-9, "{load:?}");
        assert!((load.rps - 100.0).abs() < 1e-9, "{load:?}");
    }

    #[test]
    fn an_activator_at_two_addresses_counts_once() {
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let both = |t: i64| {
            vec![
                ok("10.0.0.1:9090", steady("a", t, 4.0, 40)),
                ok("[fd00::1]:9090", steady("a", t, 4.0, 40)),
            ]
        };
        agg.observe(both(0), t0);
        let round = agg.observe(both(1), t0 + Duration::from_secs(1));
        let load = round.load(&key());
        assert!((load.concurrency - 4.0).abs() < 1e-9, "{load:?}");
        assert_eq!((load.in_flight, load.new_requests), (4, 40));
    }

    #[test]
    fn a_gone_activator_is_dropped_after_stale_after() {
        let mut agg = Aggregator::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        agg.observe(
            vec![
                ok("a", steady("a", 0, 4.0, 40)),
                ok("b", steady("b", 0, 6.0, 60)),
            ],
            at(0),
        );
        agg.observe(
            vec![
                ok("a", steady("a", 1, 4.0, 40)),
                ok("b", steady("b", 1, 6.0, 60)),
            ],
            at(1),
        );
        // b left the Service: absent from the readings.
        for s in 2..=4 {
            let round = agg.observe(vec![ok("a", steady("a", s as i64, 4.0, 40))], at(s));
            assert!(round.partial);
            assert_eq!(round.load(&key()).in_flight, 10, "b's last values kept");
        }
        let round = agg.observe(vec![ok("a", steady("a", 5, 4.0, 40))], at(5));
        assert!(!round.partial, "b forgotten");
        assert_eq!(round.stale, 0);
        assert!((round.load(&key()).concurrency - 4.0).abs() < 1e-9);
    }

    #[test]
    fn a_restart_is_a_new_baseline_not_a_negative_or_huge_rate() {
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        agg.observe(vec![ok("10.0.0.1:9090", steady("a", 0, 4.0, 40))], at(0));
        agg.observe(vec![ok("10.0.0.1:9090", steady("a", 100, 4.0, 40))], at(1));
        // Same address, new process: counters start over.
        let round = agg.observe(
            vec![ok("10.0.0.1:9090", snap("a2", 101_000, 5, 0.5, 2))],
            at(2),
        );
        let load = round.load(&key());
        assert!(round.partial, "a baseline round is partial");
        assert_eq!(load.concurrency, 2.0, "the instantaneous count stands in");
        assert_eq!(load.new_requests, 0);
        // Same id, counters went back (restarted with the same name).
        let round = agg.observe(
            vec![ok("10.0.0.1:9090", snap("a2", 102_000, 1, 0.1, 1))],
            at(3),
        );
        assert!(round.partial);
        assert_eq!(round.load(&key()).concurrency, 1.0);
        let round = agg.observe(
            vec![ok("10.0.0.1:9090", snap("a2", 103_000, 11, 3.1, 3))],
            at(4),
        );
        assert!(!round.partial);
        let load = round.load(&key());
        assert!(
            (load.concurrency - 3.0).abs() < 1e-9 && (load.rps - 10.0).abs() < 1e-9,
            "{load:?}"
        );
    }

    #[test]
    fn the_same_snapshot_twice_is_no_new_information() {
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let t0 = Instant::now();
        agg.observe(vec![ok("a", steady("a", 0, 4.0, 40))], t0);
        agg.observe(
            vec![ok("a", steady("a", 1, 4.0, 40))],
            t0 + Duration::from_secs(1),
        );
        let round = agg.observe(
            vec![ok("a", steady("a", 1, 4.0, 40))],
            t0 + Duration::from_secs(2),
        );
        assert!(round.partial);
        assert!((round.load(&key()).concurrency - 4.0).abs() < 1e-9);
    }

    fn cfg() -> ScaleConfig {
        crate::autoscaler::simulate::default_scale_config().expect("defaults resolve")
    }

    #[test]
    fn an_unanswering_activator_never_causes_a_scale_down_or_scale_to_zero() {
        // Activator b carries all of the Function's traffic (21 in flight: 3 replicas),
        // then stops answering while staying in the Service.
        let cfg = cfg();
        let mut agg = Aggregator::new(Duration::from_secs(5));
        let mut decider = Decider::new();
        let t0 = Instant::now();
        let mut current = 3;
        for s in 0..=60u64 {
            let now = t0 + Duration::from_secs(s);
            let round = agg.observe(
                vec![
                    ok("a", steady("a", s as i64, 0.0, 0)),
                    ok("b", steady("b", s as i64, 21.0, 200)),
                ],
                now,
            );
            let obs = Observation {
                current,
                ready: current,
                load: round.load(&key()),
            };
            current = decider.decide(&cfg, &obs, now).desired;
        }
        assert_eq!(current, 3);
        for s in 61..=300u64 {
            let now = t0 + Duration::from_secs(s);
            let round = agg.observe(
                vec![ok("a", steady("a", s as i64, 0.0, 0)), failed("b")],
                now,
            );
            let obs = Observation {
                current,
                ready: current,
                load: round.load(&key()),
            };
            let d = decider.decide(&cfg, &obs, now);
            assert_eq!(d.desired, 3, "second {s}: {}", d.reason);
            current = d.desired;
        }
    }

    #[test]
    fn admin_addresses_takes_ready_endpoints_on_the_admin_port() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "activator-abc", "labels": {"kubernetes.io/service-name": "zeroscale-activator"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["not-an-ip"]}
            ]
        }))
        .expect("a valid slice");
        let addrs: Vec<String> = admin_addresses(&slice)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, vec!["10.0.0.1:9090", "10.0.0.3:9090"]);
        let no_admin: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]
        }))
        .expect("a valid slice");
        assert!(admin_addresses(&no_admin).is_empty());
    }

    /// Serves `body` as the answer to one request per connection.
    async fn stats_server(body: Option<String>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    match body {
                        Some(b) => {
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                                b.len()
                            );
                            let _ = stream.write_all(resp.as_bytes()).await;
                        }
                        // A stuck activator: accepts, never answers.
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_source_reads_every_activator_and_times_out_a_stuck_one() {
        let good = stats_server(Some(
            serde_json::to_string(&steady("act-1", 1, 2.0, 10)).expect("json"),
        ))
        .await;
        let stuck = stats_server(None).await;
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let source = HttpSource::with_timeout(
            client,
            "zeroscale-system".into(),
            "zeroscale-activator".into(),
            Duration::from_millis(300),
        );
        // No API server here: fill in the endpoints the watch would have found.
        source.directory().set_addresses(None);
        let listed = source.collect().await;
        assert!(
            listed.len() == 1 && listed[0].result.is_err(),
            "before the first list the source reports an error, not an empty set"
        );
        source.directory().set_addresses(Some(vec![good, stuck]));
        let started = std::time::Instant::now();
        let mut readings = source.collect().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the stuck one did not stall the round"
        );
        readings.sort_by_key(|r| r.source.clone());
        let by_source: BTreeMap<String, Result<StatsSnapshot, String>> =
            readings.into_iter().map(|r| (r.source, r.result)).collect();
        let got = by_source[&good.to_string()].as_ref().expect("good answers");
        assert_eq!(got.activator, "act-1");
        let err = by_source[&stuck.to_string()]
            .as_ref()
            .expect_err("stuck times out");
        assert!(err.contains("no answer"), "{err}");
    }
}
