//! The local platform of `zeroscale dev` with real processes, as the activator and the
//! autoscaler use it (no activator here): wake and scale with optimistic concurrency,
//! ready endpoints, drains that wait for in-flight requests, crash loops on the status,
//! rolling replacement on a template change, and no process left behind.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use support::{alive, eventually, get, group_members, manifest, server_container, write_server};
use zeroscale::api::{CONDITION_ACTIVE, Defaults, Function, FunctionKey};
use zeroscale::platform::local::{
    Applied, Captured, FunctionView, LocalPlatform, LocalSettings, Output,
};
use zeroscale::platform::{EndpointsEvent, FunctionEvent, Platform, PlatformError, WakeOutcome};

const LIMIT: Duration = Duration::from_secs(20);

fn platform() -> (LocalPlatform, Captured) {
    let (output, lines) = Output::capture();
    let p = LocalPlatform::new(LocalSettings {
        defaults: Defaults::default(),
        cluster_domain: "cluster.local".into(),
        output,
    });
    (p, lines)
}

fn function(yaml: &str) -> Function {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn key(name: &str) -> FunctionKey {
    FunctionKey::new("default", name)
}

fn view(p: &LocalPlatform, name: &str) -> FunctionView {
    p.view()
        .into_iter()
        .find(|v| v.name == name)
        .expect("function applied")
}

fn active(p: &LocalPlatform, name: &str) -> (String, String, String) {
    let f = p.function(&key(name)).unwrap();
    let c = f
        .condition(CONDITION_ACTIVE)
        .expect("Active condition")
        .clone();
    (c.status, c.reason, c.message)
}

/// Waits until `n` replicas are ready and returns the view.
async fn ready(p: &LocalPlatform, name: &str, n: u32) -> FunctionView {
    eventually(&format!("{n} ready replicas of {name}"), LIMIT, || async {
        let v = view(p, name);
        (v.ready == n && v.processes.iter().all(|r| r.state == "ready")).then_some(v)
    })
    .await
}

fn pids(v: &FunctionView) -> Vec<u32> {
    v.processes.iter().filter_map(|r| r.pid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_starts_a_serving_process_and_scale_to_zero_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, lines) = platform();
    let f = function(&manifest(
        "hello",
        &server_container(&[]),
        "scale: {max: 3}",
    ));
    assert_eq!(p.apply(f, dir.path()).unwrap(), Applied::Created);

    // Both streams start with the full set.
    let mut functions = p.functions();
    match functions.next().await.unwrap() {
        FunctionEvent::Reset(all) => assert_eq!(all.len(), 1),
        other => panic!("expected Reset, got {other:?}"),
    }
    let mut endpoints = p.endpoints();
    match endpoints.next().await.unwrap() {
        EndpointsEvent::Reset(all) => assert_eq!(all, vec![(key("hello"), vec![])]),
        other => panic!("expected Reset, got {other:?}"),
    }
    assert_eq!(active(&p, "hello").1, "ScaledToZero");

    let scale = p.scale(&key("hello")).await.unwrap();
    assert_eq!((scale.desired, scale.ready), (0, 0));
    assert_eq!(p.wake(&key("hello"), 1).await.unwrap(), WakeOutcome::Woken);
    assert_eq!(
        p.wake(&key("hello"), 1).await.unwrap(),
        WakeOutcome::AlreadyAwake
    );

    let v = ready(&p, "hello", 1).await;
    let pid = pids(&v)[0];
    let port = v.processes[0].port.unwrap();
    let reply = get(([127, 0, 0, 1], port).into(), "x", "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("host=hello-0"), "{}", reply.body);
    assert_eq!(active(&p, "hello").0, "True");

    // The endpoints stream reports the ready replica.
    let ep = tokio::time::timeout(LIMIT, async {
        while let Some(event) = endpoints.next().await {
            if let EndpointsEvent::Updated(k, eps) = event
                && k == key("hello")
                && !eps.is_empty()
            {
                return eps;
            }
        }
        panic!("the endpoints stream ended");
    })
    .await
    .expect("an endpoints event with the ready replica");
    assert_eq!(ep[0].addr.port(), port);
    assert_eq!(ep[0].name, "hello-0");

    // Output is prefixed with the replica.
    let prefixed = format!("[default/hello-0] listening on {port}");
    eventually("the replica's prefixed output", LIMIT, || async {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|(_, l)| *l == prefixed)
            .then_some(())
    })
    .await;

    // Optimistic concurrency: a stale version is refused.
    let scale = p.scale(&key("hello")).await.unwrap();
    assert_eq!(scale.desired, 1);
    let stale = p
        .set_scale(&key("hello"), 0, Some("1"), "test")
        .await
        .unwrap_err();
    assert!(matches!(stale, PlatformError::Conflict(_)), "{stale}");
    p.set_scale(&key("hello"), 0, scale.version.as_deref(), "idle")
        .await
        .unwrap();

    eventually("the replica to exit", LIMIT, || async {
        (!alive(pid)).then_some(())
    })
    .await;
    eventually("zero replicas", LIMIT, || async {
        let v = view(&p, "hello");
        (v.replicas == 0 && v.processes.is_empty()).then_some(())
    })
    .await;
    assert_eq!(active(&p, "hello").1, "ScaledToZero");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_start_without_a_request() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    let f = function(&manifest(
        "warm",
        &server_container(&[]),
        "scale: {min: 2, max: 3}",
    ));
    p.apply(f, dir.path()).unwrap();
    let v = ready(&p, "warm", 2).await;
    let ports: Vec<_> = v.processes.iter().map(|r| r.port).collect();
    assert_ne!(ports[0], ports[1], "each replica gets its own port");
    p.shutdown().await;
    for pid in pids(&v) {
        assert!(!alive(pid), "replica {pid} outlived shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_waits_for_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    let in_flight = Arc::new(AtomicU64::new(0));
    let counter = in_flight.clone();
    p.set_in_flight(move |_| counter.load(Ordering::SeqCst));
    p.apply(
        function(&manifest("drain", &server_container(&[]), "")),
        dir.path(),
    )
    .unwrap();
    p.wake(&key("drain"), 1).await.unwrap();
    let pid = pids(&ready(&p, "drain", 1).await)[0];

    in_flight.store(1, Ordering::SeqCst);
    p.set_scale(&key("drain"), 0, None, "test").await.unwrap();
    eventually("the replica out of the endpoints", LIMIT, || async {
        (view(&p, "drain").ready == 0).then_some(())
    })
    .await;
    // Observing that nothing happens needs a pause: the request is still in flight.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(alive(pid), "stopped with a request in flight");

    in_flight.store(0, Ordering::SeqCst);
    eventually("the drained replica to exit", LIMIT, || async {
        (!alive(pid)).then_some(())
    })
    .await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    let yaml = manifest("stubborn", &server_container(&[("IGNORE_TERM", "1")]), "").replace(
        "terminationGracePeriodSeconds: 5",
        "terminationGracePeriodSeconds: 1",
    );
    p.apply(function(&yaml), dir.path()).unwrap();
    p.wake(&key("stubborn"), 1).await.unwrap();
    let pid = pids(&ready(&p, "stubborn", 1).await)[0];
    let started = tokio::time::Instant::now();
    p.set_scale(&key("stubborn"), 0, None, "test")
        .await
        .unwrap();
    eventually("SIGKILL after the grace period", LIMIT, || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "killed before its grace period: {:?}",
        started.elapsed()
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_reported_on_the_status_and_cleared_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = platform();
    let container = r#"image: python:3.12-alpine
command: [python3, -c, "import sys; print('boom: bad config', file=sys.stderr); sys.exit(3)"]"#;
    p.apply(function(&manifest("crashy", container, "")), dir.path())
        .unwrap();
    let mut functions = p.functions();
    p.wake(&key("crashy"), 1).await.unwrap();

    // The failure arrives as an `Applied` event, which is what the activator follows.
    let failed = tokio::time::timeout(LIMIT, async {
        while let Some(event) = functions.next().await {
            if let FunctionEvent::Applied(f) = event
                && let Some(failure) = f.startup_failure()
            {
                return failure;
            }
        }
        panic!("the functions stream ended");
    })
    .await
    .expect("a CrashLoop status event");
    assert!(
        failed.starts_with("CrashLoop: crashy-0 exited with code 3"),
        "{failed}"
    );
    assert!(failed.contains("boom: bad config"), "{failed}");
    let (status, reason, _) = active(&p, "crashy");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "CrashLoop"));

    // At zero the next request gets a fresh try (the fix may be outside the manifest).
    p.set_scale(&key("crashy"), 0, None, "idle").await.unwrap();
    eventually("ScaledToZero", LIMIT, || async {
        (active(&p, "crashy").1 == "ScaledToZero").then_some(())
    })
    .await;
    assert_eq!(p.function(&key("crashy")).unwrap().startup_failure(), None);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_cannot_run_locally_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = platform();
    let f = function(&manifest("image-only", "image: nginx\nargs: [--flag]", ""));
    p.apply(f, dir.path()).unwrap();
    let failure = p
        .function(&key("image-only"))
        .unwrap()
        .startup_failure()
        .unwrap();
    assert!(
        failure.starts_with("InvalidTemplate: spec.template.spec.containers[0].command"),
        "{failure}"
    );
    assert_eq!(
        p.wake(&key("image-only"), 1).await.unwrap(),
        WakeOutcome::Woken
    );
    assert!(view(&p, "image-only").processes.is_empty());

    // A missing command is a start failure reported at once, not a silent retry.
    let f = function(&manifest(
        "typo",
        "command: [no-such-command-zeroscale]",
        "",
    ));
    p.apply(f, dir.path()).unwrap();
    p.wake(&key("typo"), 1).await.unwrap();
    eventually("CreateContainerError", LIMIT, || async {
        let (_, reason, message) = active(&p, "typo");
        (reason == "CreateContainerError" && message.contains("not found")).then_some(())
    })
    .await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_changes_replace_replicas_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    let v1 = manifest("roll", &server_container(&[("VERSION", "1")]), "");
    p.apply(function(&v1), dir.path()).unwrap();
    p.wake(&key("roll"), 1).await.unwrap();
    let old = pids(&ready(&p, "roll", 1).await)[0];

    // Record every endpoints update from now on.
    let mut events = p.endpoints();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let recorder = tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let EndpointsEvent::Updated(k, eps) = e
                && k.name == "roll"
            {
                sink.lock().unwrap().push(eps.len());
            }
        }
    });

    // Scale settings alone do not restart anything.
    let v1b = manifest(
        "roll",
        &server_container(&[("VERSION", "1")]),
        "scale: {max: 5}",
    );
    assert_eq!(
        p.apply(function(&v1b), dir.path()).unwrap(),
        Applied::Updated { restart: false }
    );
    let v2 = manifest(
        "roll",
        &server_container(&[("VERSION", "2")]),
        "scale: {max: 5}",
    );
    assert_eq!(
        p.apply(function(&v2), dir.path()).unwrap(),
        Applied::Updated { restart: true }
    );
    let new = eventually("the new replica to replace the old one", LIMIT, || async {
        let v = view(&p, "roll");
        (v.processes.len() == 1 && v.processes[0].revision == 2 && v.ready == 1 && !alive(old))
            .then(|| pids(&v)[0])
    })
    .await;
    assert_ne!(new, old);
    assert_eq!(
        p.function(&key("roll")).unwrap().metadata.generation,
        Some(3)
    );
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&2),
        "old and new were never ready together: {seen:?}"
    );
    assert!(
        !seen.contains(&0),
        "the Function had no endpoint during the roll: {seen:?}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_an_exec_probe() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    let container = server_container(&[])
        + "readinessProbe:\n  exec: {command: [test, -f, ready.flag]}\n  periodSeconds: 1\n";
    p.apply(function(&manifest("gated", &container, "")), dir.path())
        .unwrap();
    p.wake(&key("gated"), 1).await.unwrap();
    eventually("the replica to listen", LIMIT, || async {
        let v = view(&p, "gated");
        let port = v.processes.first()?.port?;
        get(([127, 0, 0, 1], port).into(), "x", "/").await.ok()
    })
    .await;
    assert_eq!(view(&p, "gated").ready, 0, "ready before its probe passed");
    std::fs::write(dir.path().join("ready.flag"), "").unwrap();
    ready(&p, "gated", 1).await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_and_shutting_down_leave_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    write_server(dir.path());
    let (p, _) = platform();
    // The replica starts a child of its own: it must go with the replica's group.
    let container =
        "command: [sh, -c, \"python3 -c 'import time; time.sleep(600)' & exec python3 server.py\"]";
    for name in ["doomed", "kept"] {
        p.apply(function(&manifest(name, container, "")), dir.path())
            .unwrap();
        p.wake(&key(name), 1).await.unwrap();
    }
    let doomed = pids(&ready(&p, "doomed", 1).await)[0];
    let kept = pids(&ready(&p, "kept", 1).await)[0];
    eventually("the replica's child", LIMIT, || async {
        (group_members(kept).len() >= 2).then_some(())
    })
    .await;

    assert!(p.delete(&key("doomed")));
    eventually("the deleted Function's group to exit", LIMIT, || async {
        group_members(doomed).is_empty().then_some(())
    })
    .await;
    assert!(alive(kept));

    p.shutdown().await;
    assert_eq!(
        group_members(kept),
        Vec::<u32>::new(),
        "processes left behind"
    );
}
