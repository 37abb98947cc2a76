//! The scale benchmark of issue 16 on a real API server (`make bench-cluster`; never run
//! by CI): zeroscale installed with its chart, N Functions created at once, then
//!
//! - the time until all are Ready (from the first create, and from the last);
//! - the operator's and the activators' resident memory before and after, per Function;
//! - the API requests the operator made per Function while settling, and in a steady
//!   state (its own `zeroscale_operator_api_requests_total`);
//! - the latency of a wake from zero with N Functions present;
//! - an activator pod added: the time until every Function's slice lists it;
//! - an activator pod deleted under load through a Function's Service: the time until no
//!   slice lists it, the requests lost meanwhile, and the slices still listing it when it
//!   stops accepting connections (the goal for both is none: a Function still routed to
//!   a closed port loses its clients' requests, whichever Function the load goes through).
//!
//! Environment (besides the suite's, see `e2e_support`): `ZEROSCALE_SCALE_FUNCTIONS` (N;
//! the test is skipped without it), `ZEROSCALE_SCALE_STEADY_SECONDS` (the steady-state
//! window, default 60), `ZEROSCALE_SCALE_READY_MINUTES` (how long all N may take to be
//! Ready, default 30: 10,000 took 26 min on 2 shared CPUs), `ZEROSCALE_SCALE_REPORT` (a
//! file the figures are written to, as JSON), `ZEROSCALE_SCALE_CHART_VALUES` (chart values
//! as JSON, merged over the benchmark's: `{"functions": 30000}` to size the lame duck).
//! The Functions live in one namespace `zs-scale-*`, which zeroscale is installed to
//! watch alone; it is deleted at the end, then zeroscale.

mod e2e_support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_support::{
    Install, TestNamespace, apply, cluster, eventually, get, kubectl, merge, service_gateway,
    test_function, under_load,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::time::Instant;
use zeroscale::api::Function;
use zeroscale::operator::build::SLICE_MANAGER;

const BENCH_LABEL: &str = "zeroscale.dev/scale-bench";

/// A `/metrics` page: `process_resident_memory_bytes` and the API requests by verb.
#[derive(Debug, Default, Clone)]
struct Sample {
    rss: f64,
    requests: BTreeMap<String, f64>,
}

impl Sample {
    fn parse(text: &str) -> Self {
        let mut s = Sample::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name == "process_resident_memory_bytes" {
                s.rss = value;
            } else if name.starts_with("zeroscale_operator_api_requests_total{") {
                let verb = name
                    .split("verb=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("?");
                *s.requests.entry(verb.to_string()).or_default() += value;
            }
        }
        s
    }

    fn total(&self) -> f64 {
        self.requests.values().sum()
    }

    /// Requests by verb since `before`.
    fn since(&self, before: &Sample) -> BTreeMap<String, f64> {
        self.requests
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.requests.get(k).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    }
}

async fn scrape(addr: SocketAddr) -> Sample {
    let reply = get(addr, "metrics", "/metrics")
        .await
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    Sample::parse(&reply.body)
}

async fn pod_addrs(
    cluster: &e2e_support::Cluster,
    install: &Install,
    component: &str,
    port: u16,
) -> Vec<(String, SocketAddr)> {
    install
        .pods(cluster, component)
        .await
        .into_iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), format!("{ip}:{port}").parse().ok()?))
        })
        .collect()
}

/// The activator IPs each bench Function's slice lists as ready, kept by a watch.
#[derive(Clone, Default)]
struct Slices(Arc<Mutex<HashMap<String, Vec<String>>>>);

impl Slices {
    fn follow(client: kube::Client, prefix: String) -> Self {
        let slices = Slices::default();
        let state = slices.clone();
        let api: Api<EndpointSlice> = Api::all(client);
        let config = watcher::Config::default().labels(&format!(
            "endpointslice.kubernetes.io/managed-by={SLICE_MANAGER}"
        ));
        tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .touched_objects()
                .try_for_each(move |s| {
                    if s.namespace().is_some_and(|n| n.starts_with(&prefix)) {
                        let ips = s
                            .endpoints
                            .iter()
                            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                            .flat_map(|e| e.addresses.clone())
                            .collect();
                        let key = format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
                        state.0.lock().unwrap().insert(key, ips);
                    }
                    std::future::ready(Ok(()))
                }),
        );
        slices
    }

    /// (slices, slices listing `ip`).
    fn listing(&self, ip: &str) -> (usize, usize) {
        let all = self.0.lock().unwrap();
        (
            all.len(),
            all.values()
                .filter(|ips| ips.iter().any(|i| i == ip))
                .count(),
        )
    }
}

/// Counts the bench Functions whose status is Ready for their current generation.
#[derive(Clone, Default)]
struct ReadyCount(Arc<Mutex<HashMap<String, bool>>>);

impl ReadyCount {
    fn follow(client: kube::Client, suffix: &str) -> Self {
        let ready = ReadyCount::default();
        let state = ready.clone();
        let api: Api<Function> = Api::all(client);
        let config = watcher::Config::default().labels(&format!("{BENCH_LABEL}={suffix}"));
        tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .touched_objects()
                .try_for_each(move |f| {
                    let is_ready = f.status.as_ref().is_some_and(|s| {
                        s.observed_generation == f.metadata.generation
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Ready" && c.status == "True")
                    });
                    let key = format!("{}/{}", f.namespace().unwrap_or_default(), f.name_any());
                    state.0.lock().unwrap().insert(key, is_ready);
                    std::future::ready(Ok(()))
                }),
        );
        ready
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().values().filter(|r| **r).count()
    }
}

fn function(namespace: &str, name: &str, suffix: &str) -> Function {
    // A typical small Function: one container, one port, scale to zero.
    serde_json::from_value(json!({
        "apiVersion": "zeroscale.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name, "namespace": namespace, "labels": {BENCH_LABEL: suffix}},
        "spec": {"template": {"spec": {"containers": [{
            "name": "app",
            "image": "registry.example.com/team/app:1.2.3",
            "ports": [{"containerPort": 8080}],
        }]}}},
    }))
    .expect("a Function")
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 100.0).round() / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark on a real cluster (make bench-cluster N=1000)"]
async fn many_functions() {
    let test = "many_functions";
    let Some(n) = std::env::var("ZEROSCALE_SCALE_FUNCTIONS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        eprintln!("SKIPPED {test}: set ZEROSCALE_SCALE_FUNCTIONS to the number of Functions");
        return;
    };
    let steady = Duration::from_secs(
        std::env::var("ZEROSCALE_SCALE_STEADY_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let Some(cluster) = cluster(test).await else {
        return;
    };
    let suffix = format!("{:04x}", rand::random::<u16>());
    let mut report = serde_json::Map::new();
    report.insert("functions".into(), json!(n));
    report.insert("kubernetes".into(), json!(cluster.version_string()));
    report.insert("image".into(), json!(cluster.image));

    // --- zeroscale, one operator (its memory is the leader's), two activators, serving
    // only the bench's namespace (so that it never touches another run's Functions).
    let namespace = TestNamespace::new(&cluster, &format!("zs-scale-{suffix}")).await;
    let system = format!("zs-scale-system-{suffix}");
    let mut values = json!({
        "watchNamespaces": [namespace.name],
        "operator": {"replicas": 1},
        "activator": {"replicas": 2},
    });
    if let Ok(extra) = std::env::var("ZEROSCALE_SCALE_CHART_VALUES") {
        let extra = serde_json::from_str(&extra).expect("ZEROSCALE_SCALE_CHART_VALUES: JSON");
        merge(&mut values, &extra);
    }
    let install = Install::chart(
        &cluster,
        &format!("zeroscale-scale-{suffix}"),
        &system,
        values,
    )
    .await;
    install.wait_ready(&cluster).await;
    let operator = pod_addrs(&cluster, &install, "operator", 9090).await[0].1;
    // Settled after start-up (leader elected, caches listed).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let base = scrape(operator).await;
    let mut activator_base = Vec::new();
    for (_, addr) in pod_addrs(&cluster, &install, "activator", 9090).await {
        activator_base.push(scrape(addr).await.rss);
    }
    eprintln!(
        "{test}: operator {:.1} MB before; activators {activator_base:?}",
        base.rss / 1e6
    );

    // --- N Functions at once.
    let ready = ReadyCount::follow(cluster.client.clone(), &suffix);
    let slices = Slices::follow(cluster.client.clone(), format!("zs-scale-{suffix}"));
    let start = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let ns = namespace.name.clone();
            let client = cluster.client.clone();
            let suffix = suffix.clone();
            async move {
                let api: Api<Function> = Api::namespaced(client, &ns);
                let f = function(&ns, &format!("fn-{i:05}"), &suffix);
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &f).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(s)) if s.code == 409 => return,
                        Err(e) if attempt < 4 => {
                            eprintln!("creating {}: {e} (retrying)", f.name_any());
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => panic!("creating {}: {e}", f.name_any()),
                    }
                }
            }
        })
        .await;
    let created = start.elapsed();
    eprintln!("{test}: {n} Functions created in {created:?}");
    let ready_minutes: u64 = std::env::var("ZEROSCALE_SCALE_READY_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut last_log = Instant::now();
    loop {
        let r = ready.count();
        if r >= n {
            break;
        }
        if last_log.elapsed() > Duration::from_secs(10) {
            eprintln!("{test}: {r}/{n} Ready after {:?}", start.elapsed());
            last_log = Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60 * ready_minutes),
            "{r}/{n} Ready after {ready_minutes} minutes (ZEROSCALE_SCALE_READY_MINUTES)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = start.elapsed();
    eprintln!(
        "{test}: all {n} Ready {all_ready:?} after the first create, {:?} after the last",
        all_ready - created
    );
    report.insert("created_s".into(), json!(secs(created)));
    report.insert("all_ready_s".into(), json!(secs(all_ready)));
    report.insert(
        "ready_after_last_create_s".into(),
        json!(secs(all_ready - created)),
    );

    // --- settling and steady state.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = scrape(operator).await;
    tokio::time::sleep(steady).await;
    let after = scrape(operator).await;
    let settling = settled.since(&base);
    let steady_requests = after.since(&settled);
    let per = |m: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        m.iter()
            .map(|(k, v)| (k.clone(), (v / n as f64 * 1000.0).round() / 1000.0))
            .collect()
    };
    eprintln!(
        "{test}: operator requests per Function while settling {:?} ({:.2} in all); in {steady:?} of steady state {:?} ({} in all)",
        per(&settling),
        (settled.total() - base.total()) / n as f64,
        steady_requests,
        after.total() - settled.total()
    );
    report.insert(
        "operator_requests_per_function_settling".into(),
        json!(per(&settling)),
    );
    report.insert("operator_requests_steady".into(), json!(steady_requests));
    report.insert("steady_window_s".into(), json!(steady.as_secs()));
    let op_per = (after.rss - base.rss) / n as f64;
    eprintln!(
        "{test}: operator RSS {:.1} MB -> {:.1} MB: {:.0} B per Function",
        base.rss / 1e6,
        after.rss / 1e6,
        op_per
    );
    report.insert("operator_rss_before_mb".into(), json!(base.rss / 1e6));
    report.insert("operator_rss_after_mb".into(), json!(after.rss / 1e6));
    report.insert("operator_bytes_per_function".into(), json!(op_per.round()));
    let mut activator_after = Vec::new();
    for (_, addr) in pod_addrs(&cluster, &install, "activator", 9090).await {
        activator_after.push(scrape(addr).await.rss);
    }
    let act_per = activator_after
        .iter()
        .zip(&activator_base)
        .map(|(a, b)| (a - b) / n as f64)
        .fold(0.0, f64::max);
    eprintln!(
        "{test}: activator RSS {activator_base:?} -> {activator_after:?}: {act_per:.0} B per Function (the larger)"
    );
    report.insert(
        "activator_rss_after_mb".into(),
        json!(activator_after.iter().map(|b| b / 1e6).collect::<Vec<_>>()),
    );
    report.insert(
        "activator_bytes_per_function".into(),
        json!(act_per.round()),
    );

    // --- the kube-controller-manager's share: every Deployment synced (a ReplicaSet) and
    // every private Service given its pod slice. Its clients are rate-limited (20 writes
    // a second each by default), so N Functions at once leave it behind for a while; a
    // wake meanwhile waits in its queues, so it is measured once the backlog is gone.
    let t = Instant::now();
    let namespace_name = namespace.name.clone();
    let synced = eventually(
        "the kube-controller-manager to catch up",
        Duration::from_secs(3600),
        || {
            let client = cluster.client.clone();
            let ns = namespace_name.clone();
            async move {
                let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
                    Api::namespaced(client.clone(), &ns);
                let lp = kube::api::ListParams::default().labels("zeroscale.dev/function");
                let list = deployments.list(&lp).await.ok()?;
                let behind = list
                    .items
                    .iter()
                    .filter(|d| {
                        d.status.as_ref().and_then(|s| s.observed_generation)
                            != d.metadata.generation
                    })
                    .count();
                let slices: Api<EndpointSlice> = Api::namespaced(client, &ns);
                let lp = kube::api::ListParams::default()
                    .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io");
                let private = slices.list_metadata(&lp).await.ok()?.items.len();
                eprintln!(
                    "many_functions: kube-controller-manager: {behind} Deployments not synced, {private} pod slices"
                );
                if behind == 0 && private >= list.items.len() {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
                None
            }
        },
    )
    .await;
    eprintln!(
        "{test}: the kube-controller-manager caught up {:?} after the first create",
        synced - start
    );
    report.insert("kcm_caught_up_s".into(), json!(secs(synced - start)));
    let _ = t;

    // --- a wake from zero with N Functions present.
    let ns0 = namespace.name.clone();
    let mut wake = test_function(&ns0, "wake", json!({}));
    wake["metadata"]["labels"] = json!({BENCH_LABEL: suffix});
    apply(&wake).expect("the wake Function applies");
    eventually("the wake Function Ready", Duration::from_secs(120), || {
        let ready = ready.clone();
        async move { (ready.count() > n).then_some(()) }
    })
    .await;
    let gw = service_gateway(&cluster, &ns0, "wake").await;
    let t = Instant::now();
    let cold = get(gw.addr, &gw.host, "/").await.expect("a cold answer");
    let wake_latency = t.elapsed();
    assert_eq!(cold.status, 200, "{cold:?}");
    let mut warm = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = get(gw.addr, &gw.host, "/").await.expect("a warm answer");
        assert_eq!(r.status, 200);
        warm.push(t.elapsed());
    }
    warm.sort();
    eprintln!(
        "{test}: wake from zero {wake_latency:?} (header {:?}); warm median {:?}",
        cold.headers.get("x-zeroscale-cold-start"),
        warm[warm.len() / 2]
    );
    report.insert("wake_s".into(), json!(secs(wake_latency)));
    report.insert(
        "warm_median_ms".into(),
        json!(warm[warm.len() / 2].as_secs_f64() * 1000.0),
    );

    // --- an activator pod added: until every Function's slice lists it.
    let before: Vec<String> = pod_addrs(&cluster, &install, "activator", 9090)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let t0 = Instant::now();
    kubectl(
        &[
            "-n",
            &system,
            "scale",
            &format!("deployment/{}", install.activator),
            "--replicas=3",
        ],
        None,
    )
    .expect("scaling the activators");
    let new_ip = eventually(
        "a third activator pod with an IP",
        Duration::from_secs(120),
        || {
            let (cluster, install, before) = (cluster.clone(), &install, before.clone());
            async move {
                pod_addrs(&cluster, install, "activator", 9090)
                    .await
                    .into_iter()
                    .find(|(name, _)| !before.contains(name))
                    .map(|(_, addr)| addr.ip().to_string())
            }
        },
    )
    .await;
    let first = eventually(
        "the new activator in a first slice",
        Duration::from_secs(300),
        || {
            let slices = slices.clone();
            let ip = new_ip.clone();
            async move { (slices.listing(&ip).1 > 0).then(Instant::now) }
        },
    )
    .await;
    let all = eventually(
        "the new activator in every Function's slice",
        Duration::from_secs(1800),
        || {
            let slices = slices.clone();
            let ip = new_ip.clone();
            async move {
                let (total, listing) = slices.listing(&ip);
                (total > n && listing == total).then(Instant::now)
            }
        },
    )
    .await;
    eprintln!(
        "{test}: activator added: in every slice {:?} after the scale-up, {:?} after the first slice listed it",
        all - t0,
        all - first
    );
    report.insert("activator_added_all_slices_s".into(), json!(secs(all - t0)));
    report.insert(
        "activator_added_first_to_all_s".into(),
        json!(secs(all - first)),
    );

    // --- an activator pod deleted under load through the Function's Service.
    let victim = pod_addrs(&cluster, &install, "activator", 9090)
        .await
        .into_iter()
        .find(|(name, _)| before.contains(name))
        .expect("an original activator");
    let victim_ip = victim.1.ip().to_string();
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(cluster.client.clone(), &system);
    // The moment the deleted activator stops accepting connections (its lame duck over),
    // and how many Functions' slices still list it then: each of those Functions' clients
    // would be sent to a closed port, whichever Function the load below goes through.
    let stopped: Arc<Mutex<Option<(Instant, usize)>>> = Arc::default();
    let probe = {
        let (stopped, slices) = (stopped.clone(), slices.clone());
        let addr = SocketAddr::new(victim.1.ip(), 8080);
        let ip = victim_ip.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut reached = false;
            loop {
                tick.tick().await;
                // Taken before the attempt: when it fails, the port closed between the
                // last answered attempt and this one, within a tick of this moment.
                let (at, routed) = (Instant::now(), slices.listing(&ip).1);
                let connect = tokio::net::TcpStream::connect(addr);
                if matches!(
                    tokio::time::timeout(Duration::from_secs(1), connect).await,
                    Ok(Ok(_))
                ) {
                    reached = true;
                } else if !reached {
                    // Pod addresses not reachable from here: nothing to observe.
                    return;
                } else {
                    *stopped.lock().unwrap() = Some((at, routed));
                    return;
                }
            }
        })
    };
    let ((t0, unrouted, gone), load_report) = under_load(&gw, "/", 8, || async {
        // The clients connected and served before the pod goes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t0 = Instant::now();
        kubectl(
            &["-n", &system, "delete", "pod", &victim.0, "--wait=false"],
            None,
        )
        .expect("deleting an activator pod");
        let unrouted = eventually(
            "no slice to list the deleted activator",
            Duration::from_secs(1800),
            || {
                let slices = slices.clone();
                let ip = victim_ip.clone();
                async move { (slices.listing(&ip).1 == 0).then(Instant::now) }
            },
        )
        .await;
        eventually(
            "the deleted activator pod gone",
            Duration::from_secs(1800),
            || {
                let (pods, name) = (pods.clone(), victim.0.clone());
                async move { pods.get_opt(&name).await.ok()?.is_none().then_some(()) }
            },
        )
        .await;
        (t0, unrouted, t0.elapsed())
    })
    .await;
    probe.abort();
    let stop = *stopped.lock().unwrap();
    let lost = load_report.sent - load_report.ok();
    match stop {
        Some((at, routed)) => {
            eprintln!(
                "{test}: activator deleted: stopped accepting {:?} after, with {routed} slices still listing it",
                at - t0
            );
            report.insert(
                "activator_removed_stopped_accepting_s".into(),
                json!(secs(at - t0)),
            );
            report.insert("activator_removed_slices_at_stop".into(), json!(routed));
        }
        None => eprintln!(
            "{test}: activator deleted: when it stopped accepting was not observed (its port not reachable from here, or open until the pod was gone)"
        ),
    }
    eprintln!(
        "{test}: activator deleted: out of every slice {:?} after, pod gone after {gone:?}; {} requests, {:?} by status, {} without an answer ({lost} lost) {:?}",
        unrouted - t0,
        load_report.sent,
        load_report.statuses,
        load_report.failed,
        load_report.errors
    );
    report.insert(
        "activator_removed_all_slices_s".into(),
        json!(secs(unrouted - t0)),
    );
    report.insert("activator_removed_pod_gone_s".into(), json!(secs(gone)));
    report.insert("rollout_requests".into(), json!(load_report.sent));
    report.insert("rollout_requests_lost".into(), json!(lost));
    let final_sample = scrape(operator).await;
    report.insert(
        "operator_requests_during_activator_changes".into(),
        json!(final_sample.since(&after)),
    );

    let text = serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json");
    println!("{text}");
    if let Ok(path) = std::env::var("ZEROSCALE_SCALE_REPORT") {
        std::fs::write(&path, &text).expect("writing the report");
    }
    // Namespaces (and so the Functions) are deleted first, then zeroscale: drop order.
    drop(gw);
    drop(namespace);
    assert_eq!(lost, 0, "requests lost during the activator change");
    if let Some((_, routed)) = stop {
        assert_eq!(
            routed, 0,
            "the deleted activator stopped accepting while {routed} Functions' slices still listed it"
        );
    }
}
