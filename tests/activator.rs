//! The activator as a client meets it: real HTTP on 127.0.0.1, backends as small hyper
//! servers, Functions and endpoints pushed through the in-memory platform. Every row of
//! DESIGN.md's "What a client sees" table has a test here.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use prometheus::Encoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroscale::activator::{Activator, Settings};
use zeroscale::api::{Function, FunctionKey, FunctionSpec, FunctionStatus};
use zeroscale::platform::memory::MemoryPlatform;
use zeroscale::platform::{Candidate, Endpoint, ReadinessCheck};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

// ---------------------------------------------------------------- fixtures

fn function(name: &str, spec: serde_json::Value) -> Function {
    let mut full = serde_json::json!({"template": {"spec": {"containers": [{"name": "app"}]}}});
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            full.insert(k.clone(), v.clone());
        }
    }
    let spec: FunctionSpec = serde_json::from_value(full).unwrap();
    let mut f = Function::new(name, spec);
    f.metadata.namespace = Some("default".into());
    f
}

fn key(name: &str) -> FunctionKey {
    FunctionKey::new("default", name)
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        name: format!("replica-{}", addr.port()),
    }
}

fn crash_looping(mut f: Function) -> Function {
    f.status = Some(FunctionStatus {
        conditions: vec![Condition {
            type_: "Active".into(),
            status: "False".into(),
            reason: "CrashLoop".into(),
            message: "back-off restarting failed container app".into(),
            last_transition_time: Time(jiff::Timestamp::now()),
            observed_generation: None,
        }],
        ..FunctionStatus::default()
    });
    f
}

fn empty() -> TestBody {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

fn text(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

struct Harness {
    platform: Arc<MemoryPlatform>,
    activator: Arc<Activator>,
    registry: prometheus::Registry,
    addr: SocketAddr,
    client: Client<HttpConnector, TestBody>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<zeroscale::Result<()>>,
}

async fn start(platform: Arc<MemoryPlatform>) -> Harness {
    start_with(platform, Settings::default()).await
}

async fn start_with(platform: Arc<MemoryPlatform>, settings: Settings) -> Harness {
    let registry = prometheus::Registry::new();
    let activator = Activator::new(platform.clone(), settings, &registry).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(activator.clone().run(listener, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(10), activator.synced())
        .await
        .expect("the activator syncs with the platform");
    Harness {
        platform,
        activator,
        registry,
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        shutdown,
        task,
    }
}

impl Harness {
    fn request(&self, host: &str, path: &str) -> http::request::Builder {
        Request::get(format!("http://{}{path}", self.addr)).header("host", host)
    }

    async fn get(&self, host: &str) -> Response<Incoming> {
        self.send(self.request(host, "/").body(empty()).unwrap())
            .await
    }

    async fn send(&self, req: Request<TestBody>) -> Response<Incoming> {
        self.client
            .request(req)
            .await
            .expect("the activator answers")
    }

    fn queued(&self, name: &str) -> u64 {
        self.stats(name).map_or(0, |s| s.queued)
    }

    fn stats(&self, name: &str) -> Option<zeroscale::stats::FunctionStats> {
        self.activator
            .snapshot()
            .functions
            .into_iter()
            .find(|f| f.name == name)
    }

    fn metrics_text(&self) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}

async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Waits for a condition, polling, with a deadline (no sleep stands in for an event).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backend replica: a hyper HTTP/1.1 server calling `handler` for each request.
async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    backend_at("127.0.0.1", handler).await
}

/// A backend replica on a loopback address of its own (drains go by IP).
async fn backend_at<F, Fut>(ip: &str, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A replica that answers `reply` only when the test adds a permit to the returned gate,
/// so a request can be held in flight for as long as a test needs.
async fn gated_backend(reply: &'static str) -> (SocketAddr, Arc<Semaphore>) {
    gated_backend_at("127.0.0.1", reply).await
}

/// [`gated_backend`] on a loopback address of its own.
async fn gated_backend_at(ip: &str, reply: &'static str) -> (SocketAddr, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let addr = backend_at(ip, move |_req| {
        let gate = held.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Response::new(text(reply))
        }
    })
    .await;
    (addr, gate)
}

async fn hello_backend(reply: &'static str) -> SocketAddr {
    backend(move |_req| async move { Response::new(text(reply)) }).await
}

/// An address nobody listens on, for the whole test run: the port stays bound (never
/// listening), so connects are refused and no parallel test process can take the port
/// and answer in its place.
async fn dead_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

async fn raw_exchange(addr: SocketAddr, request: Vec<u8>) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(&request).await;
    };
    let read = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
        out
    };
    let ((), out) = tokio::join!(write, read);
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- the table

/// A lame-duck activator that no Function routes to any more ends each HTTP/1
/// keep-alive connection with its next response, so the client reconnects (elsewhere)
/// instead of reusing a connection the drain is about to close under it.
#[tokio::test]
async fn once_unrouted_every_response_ends_its_connection() {
    let replica = hello_backend("hi").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("hello", serde_json::json!({})));
    platform.set_endpoints(&key("hello"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let request = b"GET / HTTP/1.1\r\nhost: hello.default\r\n\r\n".to_vec();

    // Serving normally: the connection stays open after the answer.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    h.activator.close_connections();
    // The same keep-alive connection: answered, then closed by the activator.
    stream.write_all(&request).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the activator closes the connection after the answer")
        .unwrap();
    let head = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.ends_with("hi"), "{head}");
}

#[tokio::test]
async fn warm_response_is_streamed() {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let replica = backend(move |_req| {
        let rx = rx.lock().unwrap().take().expect("one request");
        async move { Response::new(BoxBody::new(StreamBody::new(rx))) }
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("hello", serde_json::json!({})));
    platform.set_endpoints(&key("hello"), vec![endpoint(replica)]);
    let h = start(platform).await;

    let resp = h.get("hello.default").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-zeroscale-cold-start").is_none());
    let mut body = resp.into_body();
    tx.unbounded_send(Ok(Frame::data(Bytes::from("first "))))
        .unwrap();
    // The first chunk arrives while the backend has not finished: streamed, not buffered.
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first ");
    tx.unbounded_send(Ok(Frame::data(Bytes::from("second"))))
        .unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
    assert_eq!(h.platform.wake_count(&key("hello")), 0);
}

#[tokio::test]
async fn an_http10_replica_does_not_downgrade_the_client() {
    // python's http.server answers HTTP/1.0 and closes; the client asked in HTTP/1.1 and
    // must get an HTTP/1.1 answer on a connection it can keep.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let platform = MemoryPlatform::new();
    platform.apply_function(function("hello", serde_json::json!({})));
    platform.set_endpoints(&key("hello"), vec![endpoint(replica)]);
    let h = start(platform).await;

    let out = raw_exchange(
        h.addr,
        b"GET / HTTP/1.1\r\nHost: hello.default\r\n\r\nGET / HTTP/1.1\r\nHost: hello.default\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert_eq!(
        out.matches("HTTP/1.1 200 OK").count(),
        2,
        "keep-alive kept: {out}"
    );
}

#[tokio::test]
async fn cold_request_wakes_once_and_is_marked() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "cold",
        serde_json::json!({"scale": {"initial": 2}}),
    ));
    let h = start(platform).await;

    let pending = {
        let client = h.client.clone();
        let req = h
            .request("cold.default.svc.cluster.local", "/")
            .body(empty())
            .unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    h.platform.wait_for_wakes(1).await;
    assert_eq!(h.platform.wakes(), vec![(key("cold"), 2)]);
    assert_eq!(h.platform.desired(&key("cold")), 2);

    let replica = hello_backend("hello from a woken replica").await;
    h.platform
        .set_endpoints(&key("cold"), vec![endpoint(replica)]);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-zeroscale-cold-start"], "true");
    assert_eq!(body_text(resp).await, "hello from a woken replica");

    // Warm now: no mark, no wake.
    let resp = h.get("cold.default").await;
    assert!(resp.headers().get("x-zeroscale-cold-start").is_none());
    assert_eq!(h.platform.wake_count(&key("cold")), 1);
    let metrics = h.metrics_text();
    assert!(metrics.contains(
        "zeroscale_activator_cold_starts_total{function=\"cold\",namespace=\"default\"} 1"
    ));
    assert!(metrics.contains("zeroscale_activator_wake_to_ready_seconds_count"));
}

#[tokio::test]
async fn unknown_host_is_404_naming_the_host() {
    let h = start(MemoryPlatform::new()).await;
    let resp = h.get("nobody.example.com:8080").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(body_text(resp).await.contains("nobody.example.com"));
}

#[tokio::test]
async fn extra_hosts_route_case_insensitively() {
    let replica = hello_backend("via extra host").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "web",
        serde_json::json!({"hosts": ["web.example.com"]}),
    ));
    platform.set_endpoints(&key("web"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let resp = h.get("WEB.Example.com:80").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "via extra host");
}

#[tokio::test]
async fn queue_full_is_503_with_retry_after() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "busy",
        serde_json::json!({"queue": {"capacity": 2}}),
    ));
    let h = start(platform).await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let client = h.client.clone();
        let req = h.request("busy.default", "/").body(empty()).unwrap();
        waiting.push(tokio::spawn(async move { client.request(req).await }));
    }
    eventually("two queued requests", || h.queued("busy") == 2).await;
    let resp = h.get("busy.default").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    // The queued ones are still served once a replica is ready.
    let replica = hello_backend("ok").await;
    h.platform
        .set_endpoints(&key("busy"), vec![endpoint(replica)]);
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test(start_paused = true)]
async fn no_replica_within_activation_timeout_is_504() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "slow",
        serde_json::json!({"timeouts": {"activation": "5s"}}),
    ));
    let settings = Settings {
        header_read_timeout: Duration::from_secs(3600),
        ..Settings::default()
    };
    let h = start_with(platform, settings).await;
    let started = Instant::now();
    let resp = h.get("slow.default").await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    assert_eq!(h.platform.wake_count(&key("slow")), 1);
    assert_eq!(h.queued("slow"), 0);
}

#[tokio::test]
async fn startup_failure_fails_queued_and_new_requests_with_the_reason() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("broken", serde_json::json!({})));
    let h = start(platform).await;
    let queued = {
        let client = h.client.clone();
        let req = h.request("broken.default", "/").body(empty()).unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    eventually("a queued request", || h.queued("broken") == 1).await;
    h.platform
        .apply_function(crash_looping(function("broken", serde_json::json!({}))));

    let resp = queued.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body_text(resp)
            .await
            .contains("CrashLoop: back-off restarting")
    );

    let resp = h.get("broken.default").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_text(resp).await.contains("CrashLoop"));
}

#[tokio::test]
async fn invalid_function_is_503_with_the_reason() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "bad",
        serde_json::json!({"scale": {"min": 3, "max": 1}}),
    ));
    let h = start(platform).await;
    let resp = h.get("bad.default").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_text(resp).await.contains("spec.scale.min"));
}

#[tokio::test]
async fn unreachable_replicas_are_502_and_a_live_one_is_found() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("gone", serde_json::json!({})));
    platform.set_endpoints(
        &key("gone"),
        vec![endpoint(dead_addr().await), endpoint(dead_addr().await)],
    );
    let h = start(platform).await;
    let resp = h.get("gone.default").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

    // One dead, one alive: every request ends on the live one.
    let alive = hello_backend("alive").await;
    h.platform.set_endpoints(
        &key("gone"),
        vec![endpoint(dead_addr().await), endpoint(alive)],
    );
    for _ in 0..10 {
        let resp = h.get("gone.default").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "alive");
    }
    // Each request counted once for the autoscaler, also those the fast lane handed
    // over after its connect failed.
    assert_eq!(h.stats("gone").unwrap().requests_total, 11);
}

#[tokio::test]
async fn malformed_and_oversized_requests() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("limits", serde_json::json!({})));
    let counted = Arc::new(AtomicUsize::new(0));
    let seen = counted.clone();
    let replica = backend(move |req| {
        let seen = seen.clone();
        async move {
            let n = req.into_body().collect().await.map(|b| b.to_bytes().len());
            seen.fetch_add(1, Ordering::SeqCst);
            Response::new(text(format!("{n:?}")))
        }
    })
    .await;
    platform.set_endpoints(&key("limits"), vec![endpoint(replica)]);
    let settings = Settings {
        max_body_bytes: 1024,
        max_header_bytes: 8192,
        ..Settings::default()
    };
    let h = start_with(platform, settings).await;

    // 400: not HTTP.
    let out = raw_exchange(h.addr, b"GARBAGE\r\n\r\n".to_vec()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // 400: HTTP/1.1 without a Host.
    let out = raw_exchange(h.addr, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // 431: a head over the limit.
    let mut big = b"GET / HTTP/1.1\r\nHost: limits.default\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 9000));
    big.extend_from_slice(b"\r\n\r\n");
    let out = raw_exchange(h.addr, big).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // 413: a declared length over the limit, refused before anything is sent on.
    let req = Request::post(format!("http://{}/", h.addr))
        .header("host", "limits.default")
        .body(text(vec![b'x'; 2048]))
        .unwrap();
    assert_eq!(h.send(req).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // 413: a chunked body that grows over the limit as it streams.
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'y'; 512])))),
    );
    let req = Request::post(format!("http://{}/", h.addr))
        .header("host", "limits.default")
        .body(BoxBody::new(StreamBody::new(chunks)))
        .unwrap();
    assert_eq!(h.send(req).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Within the limits all is well.
    let req = Request::post(format!("http://{}/", h.addr))
        .header("host", "limits.default")
        .body(text(vec![b'z'; 1000]))
        .unwrap();
    let resp = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "Ok(1000)");
}

// ---------------------------------------------------------------- the cold path under load

#[tokio::test]
async fn storm_of_cold_requests_wakes_once_and_serves_or_sheds_each() {
    const STORM: usize = 300;
    const CAPACITY: usize = 200;
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "storm",
        serde_json::json!({"queue": {"capacity": CAPACITY}}),
    ));
    let h = start(platform).await;
    let mut requests = Vec::new();
    for _ in 0..STORM {
        let client = h.client.clone();
        let req = h.request("storm.default", "/").body(empty()).unwrap();
        requests.push(tokio::spawn(async move {
            client.request(req).await.map(|r| r.status())
        }));
    }
    eventually("the queue to fill", || h.queued("storm") == CAPACITY as u64).await;
    eventually("all requests to arrive", || {
        h.stats("storm")
            .is_some_and(|s| s.requests_total == STORM as u64)
    })
    .await;
    let replica = hello_backend("ok").await;
    h.platform
        .set_endpoints(&key("storm"), vec![endpoint(replica)]);

    let mut ok = 0;
    let mut shed = 0;
    for r in requests {
        let status = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("no request hangs")
            .unwrap()
            .unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => shed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, shed), (CAPACITY, STORM - CAPACITY));
    assert_eq!(h.platform.wake_count(&key("storm")), 1);
    eventually("nothing left in flight", || {
        h.stats("storm")
            .is_some_and(|s| s.in_flight == 0 && s.queued == 0)
    })
    .await;
}

#[tokio::test]
async fn failed_wake_is_retried_while_requests_wait() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("flaky", serde_json::json!({})));
    platform.fail_next_wakes(2);
    let h = start(platform).await;
    let pending = {
        let client = h.client.clone();
        let req = h.request("flaky.default", "/").body(empty()).unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    h.platform.wait_for_wakes(3).await;
    assert_eq!(h.platform.desired(&key("flaky")), 1);
    let replica = hello_backend("ok").await;
    h.platform
        .set_endpoints(&key("flaky"), vec![endpoint(replica)]);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.platform.wake_count(&key("flaky")), 3);
}

#[tokio::test]
async fn a_client_that_disconnects_leaves_the_queue() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "leave",
        serde_json::json!({"queue": {"capacity": 1}}),
    ));
    let h = start(platform).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: leave.default\r\n\r\n")
        .await
        .unwrap();
    eventually("the request to queue", || h.queued("leave") == 1).await;
    drop(stream);
    eventually("its slot to be freed", || h.queued("leave") == 0).await;

    // The slot is really free: the next request queues instead of being shed.
    let next = {
        let client = h.client.clone();
        let req = h.request("leave.default", "/").body(empty()).unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    eventually("the next request to queue", || h.queued("leave") == 1).await;
    let replica = hello_backend("ok").await;
    h.platform
        .set_endpoints(&key("leave"), vec![endpoint(replica)]);
    assert_eq!(next.await.unwrap().unwrap().status(), StatusCode::OK);
}

// ---------------------------------------------------------------- the warm path

#[tokio::test]
async fn container_concurrency_caps_each_replica_and_excess_waits() {
    let current = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let replica = {
        let (current, max, gate) = (current.clone(), max.clone(), gate.clone());
        backend(move |_req| {
            let (current, max, gate) = (current.clone(), max.clone(), gate.clone());
            async move {
                let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                gate.acquire().await.unwrap().forget();
                current.fetch_sub(1, Ordering::SeqCst);
                Response::new(text("done"))
            }
        })
        .await
    };
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "capped",
        serde_json::json!({"scale": {"containerConcurrency": 1}}),
    ));
    platform.set_endpoints(&key("capped"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let mut requests = Vec::new();
    for _ in 0..3 {
        let client = h.client.clone();
        let req = h.request("capped.default", "/").body(empty()).unwrap();
        requests.push(tokio::spawn(async move { client.request(req).await }));
    }
    eventually("one at the replica and two queued", || {
        current.load(Ordering::SeqCst) == 1
            && h.stats("capped")
                .is_some_and(|s| s.in_flight == 1 && s.queued == 2)
    })
    .await;
    gate.add_permits(3);
    for r in requests {
        let resp = r.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Waiting for capacity is not a cold start.
        assert!(resp.headers().get("x-zeroscale-cold-start").is_none());
    }
    assert_eq!(max.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn load_is_spread_over_replicas() {
    let hits = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut eps = Vec::new();
    for i in 0..2 {
        let hits = hits.clone();
        eps.push(endpoint(
            backend(move |_req| {
                hits[i].fetch_add(1, Ordering::SeqCst);
                async { Response::new(text("ok")) }
            })
            .await,
        ));
    }
    let platform = MemoryPlatform::new();
    platform.apply_function(function("spread", serde_json::json!({})));
    platform.set_endpoints(&key("spread"), eps);
    let h = start(platform).await;
    for _ in 0..40 {
        assert_eq!(h.get("spread.default").await.status(), StatusCode::OK);
    }
    let (a, b) = (
        hits[0].load(Ordering::SeqCst),
        hits[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 40);
    assert!(a > 0 && b > 0, "{a} / {b}");
}

/// A replica being stopped calls the activator from its preStop hook (operator::build):
/// the answer comes only once no activator routes new requests to it and the requests
/// already on it have finished, so SIGTERM never cuts one of them.
#[tokio::test]
async fn a_drain_waits_until_the_stopping_replica_is_unrouted_and_idle() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("f", serde_json::json!({})));
    let h = start(platform.clone()).await;
    // The stopping replica on its own loopback address (drains go by IP).
    let (stopping, stopping_gate) = gated_backend_at("127.0.0.2", "stopping").await;
    let staying = hello_backend("staying").await;

    // A request in flight on the replica that is about to stop.
    h.platform
        .set_endpoints(&key("f"), vec![endpoint(stopping)]);
    let held = tokio::spawn({
        let req = h.request("f.default", "/").body(empty()).unwrap();
        let client = h.client.clone();
        async move { body_text(client.request(req).await.unwrap()).await }
    });
    eventually("the request to be in flight", || {
        h.activator.endpoint_in_flight(stopping) == 1
    })
    .await;
    h.platform
        .set_endpoints(&key("f"), vec![endpoint(stopping), endpoint(staying)]);

    // Its pod is deleted: the kubelet calls the drain hook at the activator Service's IP.
    h.platform
        .set_stopping(&key("f"), vec!["127.0.0.2".parse().unwrap()]);
    let drain = tokio::spawn({
        let req = h
            .request("10.96.0.20", "/.zeroscale/drain/default/f")
            .body(empty())
            .unwrap();
        let client = h.client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            (resp.status(), body_text(resp).await)
        }
    });
    tokio::pin!(drain);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut drain)
            .await
            .is_err(),
        "still routed: the drain must wait"
    );

    // The endpoints catch up: new requests go to the other replica only...
    h.platform.set_endpoints(&key("f"), vec![endpoint(staying)]);
    for _ in 0..5 {
        assert_eq!(body_text(h.get("f.default").await).await, "staying");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut drain)
            .await
            .is_err(),
        "a request is still in flight: the drain must wait"
    );
    // ...and once the held request is answered, the drain is.
    stopping_gate.add_permits(1);
    assert_eq!(held.await.unwrap(), "stopping");
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain answers once the replica is idle")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "drained");

    // A drain with nothing stopping answers at once; the path is not a Function's.
    h.platform.set_stopping(&key("f"), vec![]);
    let resp = h
        .send(
            h.request("10.96.0.20", "/.zeroscale/drain/default/f")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(body_text(resp).await, "nothing to drain");
    let resp = h
        .send(
            h.request("f.default", "/.zeroscale/drain/default/f")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(body_text(resp).await, "staying", "a Function's own path");
}

/// A Function deleted while a long request is in flight: its pods are garbage collected
/// and each calls the drain hook; the answer must still wait for that request, although
/// the activator no longer routes anything of that Function.
#[tokio::test]
async fn a_drain_after_the_function_is_deleted_still_waits_for_its_requests() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("gone", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let (replica, gate) = gated_backend_at("127.0.0.3", "finished").await;
    h.platform
        .set_endpoints(&key("gone"), vec![endpoint(replica)]);
    let held = tokio::spawn({
        let req = h.request("gone.default", "/").body(empty()).unwrap();
        let client = h.client.clone();
        async move { body_text(client.request(req).await.unwrap()).await }
    });
    eventually("the request to be in flight", || {
        h.activator.endpoint_in_flight(replica) == 1
    })
    .await;

    // The Function goes; its endpoints with it; its pod is stopping.
    h.platform.delete_function(&key("gone"));
    h.platform.set_endpoints(&key("gone"), vec![]);
    h.platform
        .set_stopping(&key("gone"), vec!["127.0.0.3".parse().unwrap()]);
    let drain = tokio::spawn({
        let req = h
            .request("10.96.0.20", "/.zeroscale/drain/default/gone")
            .body(empty())
            .unwrap();
        let client = h.client.clone();
        async move { body_text(client.request(req).await.unwrap()).await }
    });
    tokio::pin!(drain);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut drain)
            .await
            .is_err(),
        "a request is still in flight: the drain must wait"
    );
    gate.add_permits(1);
    assert_eq!(held.await.unwrap(), "finished");
    let body = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain answers once the request is done")
        .unwrap();
    assert_eq!(body, "drained");
}

#[tokio::test]
async fn a_replica_dying_mid_response_cuts_that_response_only() {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let replica = backend(move |req| {
        let rx = if req.uri().path() == "/die" {
            rx.lock().unwrap().take()
        } else {
            None
        };
        async move {
            match rx {
                Some(rx) => Response::new(BoxBody::new(StreamBody::new(rx))),
                None => Response::new(text("fine")),
            }
        }
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("dies", serde_json::json!({})));
    platform.set_endpoints(&key("dies"), vec![endpoint(replica)]);
    let h = start(platform).await;

    let resp = h
        .send(h.request("dies.default", "/die").body(empty()).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    tx.unbounded_send(Ok(Frame::data(Bytes::from("partial"))))
        .unwrap();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "partial");
    // The replica dies: its connection is cut mid-body.
    tx.unbounded_send(Err("replica crashed".into())).unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the cut response ends");
    assert!(rest.is_err(), "the client sees the response is incomplete");

    eventually("the request to leave the counters", || {
        h.stats("dies").is_some_and(|s| s.in_flight == 0)
    })
    .await;
    let resp = h.get("dies.default").await;
    assert_eq!(body_text(resp).await, "fine");
}

#[tokio::test]
async fn websocket_echo_through_the_activator() {
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = ws_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = ws_listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let platform = MemoryPlatform::new();
    platform.apply_function(function("echo", serde_json::json!({})));
    platform.set_endpoints(&key("echo"), vec![endpoint(ws_addr)]);
    let h = start(platform).await;

    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://echo.default/chat", stream)
        .await
        .expect("the upgrade goes through");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "world"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.to_text().unwrap(), text);
    }
    // The open tunnel counts as a request in flight; closing it ends it.
    assert_eq!(h.stats("echo").unwrap().in_flight, 1);
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("the tunnel to close", || {
        h.stats("echo").is_some_and(|s| s.in_flight == 0)
    })
    .await;
}

#[tokio::test]
async fn large_upload_is_streamed_through() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 512; // 32 MiB
    let replica = backend(|req| async move {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            n += frame.unwrap().into_data().map_or(0, |d| d.len());
        }
        Response::new(text(n.to_string()))
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("upload", serde_json::json!({})));
    platform.set_endpoints(&key("upload"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    let frames = futures::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone()))),
    );
    let req = Request::post(format!("http://{}/upload", h.addr))
        .header("host", "upload.default")
        .body(BoxBody::new(StreamBody::new(frames)))
        .unwrap();
    let resp = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, (CHUNK * CHUNKS).to_string());
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let replica = hello_backend("over h2c").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("h2", serde_json::json!({})));
    platform.set_endpoints(&key("h2"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let client: Client<HttpConnector, TestBody> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!("http://{}/", h.addr))
        .header("host", "h2.default")
        .body(empty())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "over h2c");
}

// ---------------------------------------------------------------- header hygiene

#[tokio::test]
async fn hop_by_hop_and_spoofed_headers_do_not_reach_the_replica() {
    let replica = backend(|req| async move {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        let mut resp = Response::new(text(lines.join("\n")));
        resp.headers_mut()
            .insert("connection", "x-backend-hop".parse().unwrap());
        resp.headers_mut()
            .insert("x-backend-hop", "1".parse().unwrap());
        resp.headers_mut()
            .insert("x-zeroscale-cold-start", "true".parse().unwrap());
        resp
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("hdr", serde_json::json!({})));
    platform.set_endpoints(&key("hdr"), vec![endpoint(replica)]);
    let h = start(platform).await;

    let req = h
        .request("hdr.default", "/")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-zeroscale-internal", "spoofed")
        .header("x-app", "kept")
        .body(empty())
        .unwrap();
    let resp = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-backend-hop").is_none());
    let seen = body_text(resp).await;
    for absent in [
        "x-client-hop",
        "proxy-connection",
        "te:",
        "6.6.6.6",
        "evil.example",
        "x-zeroscale",
    ] {
        assert!(
            !seen.contains(absent),
            "{absent} reached the replica:\n{seen}"
        );
    }
    for present in [
        "x-app: kept",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: hdr.default",
        "host: hdr.default",
    ] {
        assert!(seen.contains(present), "{present} missing:\n{seen}");
    }
}

#[tokio::test]
async fn trusted_proxies_extend_the_forwarding_chain() {
    let replica = backend(|req| async move {
        let xff = req
            .headers()
            .get("x-forwarded-for")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        Response::new(text(xff))
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("chain", serde_json::json!({})));
    platform.set_endpoints(&key("chain"), vec![endpoint(replica)]);
    let settings = Settings {
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Settings::default()
    };
    let h = start_with(platform, settings).await;
    let req = h
        .request("chain.default", "/")
        .header("x-forwarded-for", "203.0.113.5")
        .body(empty())
        .unwrap();
    assert_eq!(body_text(h.send(req).await).await, "203.0.113.5, 127.0.0.1");
}

// ---------------------------------------------------------------- stats, routing changes, shutdown

#[tokio::test]
async fn stats_and_metrics_follow_requests() {
    let replica = hello_backend("ok").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("counted", serde_json::json!({})));
    platform.apply_function(function("idle", serde_json::json!({})));
    platform.set_endpoints(&key("counted"), vec![endpoint(replica)]);
    let h = start(platform).await;
    for _ in 0..5 {
        body_text(h.get("counted.default").await).await;
    }
    let snap = h.activator.snapshot();
    assert_eq!(snap.activator, "activator");
    // Functions without traffic cost nothing and are not reported.
    assert_eq!(snap.functions.len(), 1);
    let s = &snap.functions[0];
    assert_eq!((s.requests_total, s.in_flight, s.queued), (5, 0, 0));
    assert!(s.concurrency_seconds_total > 0.0);
    assert!(s.last_request_unix_ms.is_some());

    let route = h.activator.admin_route();
    let resp = route("/stats").expect("/stats is served");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let parsed: zeroscale::stats::StatsSnapshot = serde_json::from_slice(&body).unwrap();
    assert_eq!(parsed.functions[0].requests_total, 5);

    let metrics = h.metrics_text();
    assert!(metrics.contains(
        "zeroscale_activator_requests_total{code=\"200\",function=\"counted\",namespace=\"default\"} 5"
    ), "{metrics}");
    assert!(metrics.contains("zeroscale_activator_request_duration_seconds_count{function=\"counted\",namespace=\"default\"} 5"));
    assert!(
        metrics.contains(
            "zeroscale_activator_queue_depth{function=\"counted\",namespace=\"default\"} 0"
        )
    );
}

#[tokio::test]
async fn deleted_function_stops_routing() {
    let replica = hello_backend("ok").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("temp", serde_json::json!({})));
    platform.set_endpoints(&key("temp"), vec![endpoint(replica)]);
    let h = start(platform).await;
    assert_eq!(h.get("temp.default").await.status(), StatusCode::OK);
    h.platform.delete_function(&key("temp"));
    eventually("the Function to leave the table", || {
        h.activator.function_count() == 0
    })
    .await;
    assert_eq!(h.get("temp.default").await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn endpoint_in_flight_tracks_a_replica_until_its_requests_end() {
    let (replica, gate) = gated_backend("drained").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("drain", serde_json::json!({})));
    platform.set_endpoints(&key("drain"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let pending = {
        let client = h.client.clone();
        let req = h.request("drain.default", "/").body(empty()).unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    eventually("the request to reach the replica", || {
        h.activator.endpoint_in_flight(replica) == 1
    })
    .await;
    // Removed from the ready set (scale-down), its request still counts.
    h.platform.set_endpoints(&key("drain"), vec![]);
    eventually("the endpoint update to apply", || {
        h.activator.endpoint_in_flight(replica) == 1
    })
    .await;
    gate.add_permits(1);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(body_text(resp).await, "drained");
    eventually("the replica to drain", || {
        h.activator.endpoint_in_flight(replica) == 0
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
    let (replica, gate) = gated_backend("finished").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("graceful", serde_json::json!({})));
    platform.set_endpoints(&key("graceful"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let pending = {
        let client = h.client.clone();
        let req = h.request("graceful.default", "/").body(empty()).unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    eventually("a request in flight", || {
        h.stats("graceful").is_some_and(|s| s.in_flight == 1)
    })
    .await;
    h.shutdown.cancel();
    eventually("the listener to close", || {
        std::net::TcpStream::connect(h.addr).is_err()
    })
    .await;
    gate.add_permits(1);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(body_text(resp).await, "finished");
    tokio::time::timeout(Duration::from_secs(10), h.task)
        .await
        .expect("run returns after draining")
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_answer_within_the_request_timeout_is_504() {
    let replica = backend(|_req| async {
        futures::future::pending::<()>().await;
        Response::new(empty())
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "stuck",
        serde_json::json!({"timeouts": {"request": "3s"}}),
    ));
    platform.set_endpoints(&key("stuck"), vec![endpoint(replica)]);
    let settings = Settings {
        header_read_timeout: Duration::from_secs(3600),
        ..Settings::default()
    };
    let h = start_with(platform, settings).await;
    let started = Instant::now();
    let resp = h.get("stuck.default").await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_secs(3));
    eventually("the request to leave the counters", || {
        h.stats("stuck").is_some_and(|s| s.in_flight == 0)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_client_too_slow_to_send_its_head_is_disconnected() {
    let settings = Settings {
        header_read_timeout: Duration::from_secs(2),
        ..Settings::default()
    };
    let h = start_with(MemoryPlatform::new(), settings).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: slow")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
}

#[tokio::test]
async fn a_request_body_survives_a_retry_after_a_connect_failure() {
    let replica = backend(|req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(text(body))
    })
    .await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("retry", serde_json::json!({})));
    platform.set_endpoints(
        &key("retry"),
        vec![
            endpoint(dead_addr().await),
            endpoint(dead_addr().await),
            endpoint(replica),
        ],
    );
    let h = start(platform).await;
    for i in 0..10 {
        let chunks = futures::stream::iter(
            ["part one, ", "part two"].map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c)))),
        );
        let req = Request::post(format!("http://{}/", h.addr))
            .header("host", "retry.default")
            .body(BoxBody::new(StreamBody::new(chunks)))
            .unwrap();
        let resp = h.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK, "attempt {i}");
        assert_eq!(body_text(resp).await, "part one, part two");
    }
}

#[tokio::test]
async fn a_relist_is_the_truth() {
    let replica = hello_backend("ok").await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("stays", serde_json::json!({})));
    platform.set_endpoints(&key("stays"), vec![endpoint(replica)]);
    let h = start(platform).await;
    assert_eq!(h.get("stays.default").await.status(), StatusCode::OK);
    h.platform.relist();
    assert_eq!(h.get("stays.default").await.status(), StatusCode::OK);
    assert_eq!(h.activator.function_count(), 1);
}

#[tokio::test]
async fn a_replica_closing_kept_alive_connections_does_not_fail_requests() {
    // A replica that answers one request per connection and closes it without saying so.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let platform = MemoryPlatform::new();
    platform.apply_function(function("oneshot", serde_json::json!({})));
    platform.set_endpoints(&key("oneshot"), vec![endpoint(addr)]);
    let h = start(platform).await;
    for i in 0..50 {
        let resp = h.get("oneshot.default").await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        assert_eq!(body_text(resp).await, "ok");
    }
}

#[tokio::test]
async fn connects_cut_short_by_the_request_timeout_do_not_block_later_ones() {
    // A replica whose accept queue is full (listen backlog 1, two connections never
    // accepted): the kernel drops further SYNs, so connects to it hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filler = Vec::new();
    for _ in 0..2 {
        filler.push(TcpStream::connect(addr).await.unwrap());
    }
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "hung",
        serde_json::json!({"timeouts": {"request": "1s"}}),
    ));
    platform.set_endpoints(&key("hung"), vec![endpoint(addr)]);
    let h = start(platform).await;
    // More requests than the pool opens connections at once, each given up by its
    // request timeout while its connect hangs.
    let given_up = futures::future::join_all((0..10).map(|_| h.get("hung.default"))).await;
    for resp in given_up {
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    }
    // The replica comes back: accepted connections now get answers.
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    service_fn(|_req| async { Ok::<_, Infallible>(Response::new(text("back"))) });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    // Its SYNs were dropped while the queue was full; a retransmission gets through
    // within a few seconds, so one request may still time out before that.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let resp = h.get("hung.default").await;
        if resp.status() == StatusCode::OK {
            assert_eq!(body_text(resp).await, "back");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica stays unreachable: connect slots given up mid-connect were never returned"
        );
    }
    drop(filler);
}

// ------------------------------------------- cold starts below the platform floor
//
// The platform offers the pods of a waking Function as candidates before it lists them
// ready; the activator probes them itself and routes replayable requests to the first
// that passes (`activator::early`). These scenarios hold it to "never an error or a
// wrong answer because a pod was used early".

fn candidate(name: &str, addr: SocketAddr, checks: Vec<ReadinessCheck>) -> Candidate {
    Candidate {
        name: name.into(),
        addr,
        checks: Some(checks),
        timeout: Duration::from_secs(1),
        success_threshold: 1,
        agree_within: Duration::from_secs(60),
        terminating: false,
    }
}

fn tcp_check(addr: SocketAddr) -> ReadinessCheck {
    ReadinessCheck::Tcp { port: addr.port() }
}

fn http_check(addr: SocketAddr, path: &str) -> ReadinessCheck {
    ReadinessCheck::Http {
        port: addr.port(),
        path: path.into(),
        headers: vec![],
    }
}

fn named(name: &str, addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        name: name.into(),
    }
}

/// A replica that answers 503 on every path until `ready` is set, then `reply` (and 200
/// on `/healthz`); it counts the requests to paths other than `/healthz`, and the checks.
struct Warming {
    addr: SocketAddr,
    ready: Arc<std::sync::atomic::AtomicBool>,
    requests: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
}

async fn warming_backend(reply: &'static str) -> Warming {
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let checks = Arc::new(AtomicUsize::new(0));
    let (r, q, c) = (ready.clone(), requests.clone(), checks.clone());
    let addr = backend(move |req| {
        let up = r.load(Ordering::SeqCst);
        if req.uri().path() == "/healthz" {
            c.fetch_add(1, Ordering::SeqCst);
        } else {
            q.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            let mut resp = Response::new(text(if up { reply } else { "warming up" }));
            if !up {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        }
    })
    .await;
    Warming {
        addr,
        ready,
        requests,
        checks,
    }
}

fn spawn_get(h: &Harness, host: &str) -> tokio::task::JoinHandle<(StatusCode, String, bool)> {
    let client = h.client.clone();
    let req = h.request(host, "/").body(empty()).unwrap();
    tokio::spawn(async move {
        let resp = client.request(req).await.expect("the activator answers");
        let status = resp.status();
        let cold = resp.headers().contains_key("x-zeroscale-cold-start");
        (status, body_text(resp).await, cold)
    })
}

fn counter(metrics: &str, name: &str, outcome: &str) -> u64 {
    let prefix = format!("{name}{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_cold_request_is_served_by_a_probed_replica_before_the_platform_lists_it() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("early", serde_json::json!({})));
    let h = start(platform.clone()).await;
    assert_eq!(
        platform.candidate_watches_opened(&key("early")),
        0,
        "no pod watch while at zero"
    );

    let pending = spawn_get(&h, "early.default");
    platform.wait_for_wakes(1).await;
    eventually("the candidates to be watched", || {
        platform.candidate_watches(&key("early")) == 1
    })
    .await;
    let replica = hello_backend("served early").await;
    platform.set_candidates(
        &key("early"),
        vec![candidate("early-1", replica, vec![tcp_check(replica)])],
    );
    let (status, body, cold) = pending.await.unwrap();
    assert_eq!(
        (status, body.as_str(), cold),
        (StatusCode::OK, "served early", true)
    );
    assert!(
        platform.endpoints_of(&key("early")).is_empty(),
        "answered before the platform listed the replica"
    );
    // Requests meanwhile go there too; the pod watch stays while nothing is listed.
    assert_eq!(
        body_text(h.get("early.default").await).await,
        "served early"
    );
    assert_eq!(platform.candidate_watches(&key("early")), 1);

    // The platform catches up: its view takes over and the pod watch closes.
    platform.set_endpoints(&key("early"), vec![named("early-1", replica)]);
    eventually("the pod watch to close", || {
        platform.candidate_watches(&key("early")) == 0
    })
    .await;
    let resp = h.get("early.default").await;
    assert!(resp.headers().get("x-zeroscale-cold-start").is_none());
    assert_eq!(body_text(resp).await, "served early");
    assert_eq!(platform.wake_count(&key("early")), 1);
    let m = h.metrics_text();
    assert_eq!(
        counter(&m, "zeroscale_activator_early_routes_total", "routed"),
        1
    );
    assert_eq!(
        counter(&m, "zeroscale_activator_early_requests_total", "answered"),
        2
    );
}

#[tokio::test]
async fn an_http_check_holds_requests_until_the_app_says_it_is_ready() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("app", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let app = warming_backend("ready now").await;

    let pending = spawn_get(&h, "app.default");
    platform.wait_for_wakes(1).await;
    platform.set_candidates(
        &key("app"),
        vec![candidate(
            "app-1",
            app.addr,
            vec![http_check(app.addr, "/healthz")],
        )],
    );
    eventually("the app to be checked a few times", || {
        app.checks.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        app.requests.load(Ordering::SeqCst),
        0,
        "nothing is sent while its check fails"
    );
    app.ready.store(true, Ordering::SeqCst);
    let (status, body, cold) = pending.await.unwrap();
    assert_eq!(
        (status, body.as_str(), cold),
        (StatusCode::OK, "ready now", true)
    );
    assert_eq!(app.requests.load(Ordering::SeqCst), 1);
    assert!(platform.endpoints_of(&key("app")).is_empty());
}

#[tokio::test]
async fn an_app_that_listens_before_it_is_ready_costs_a_replay_not_an_error() {
    // No readinessProbe: the activator's check is a TCP connect, which passes as soon as
    // the app listens, while it still answers 503.
    let platform = MemoryPlatform::new();
    platform.apply_function(function("slowpoke", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let app = warming_backend("warm").await;

    let pending = spawn_get(&h, "slowpoke.default");
    platform.wait_for_wakes(1).await;
    platform.set_candidates(
        &key("slowpoke"),
        vec![candidate("slowpoke-1", app.addr, vec![tcp_check(app.addr)])],
    );
    eventually("the 503 to be replayed", || {
        counter(
            &h.metrics_text(),
            "zeroscale_activator_early_requests_total",
            "replayed",
        ) == 1
    })
    .await;
    assert_eq!(h.queued("slowpoke"), 1, "the request waits again");
    assert!(!pending.is_finished());
    // Later requests are not sent there again either: it is the platform's call now.
    let second = spawn_get(&h, "slowpoke.default");
    eventually("the second request to queue", || h.queued("slowpoke") == 2).await;
    assert_eq!(app.requests.load(Ordering::SeqCst), 1);

    // The kubelet would have marked it ready once it is: then the slice lists it.
    app.ready.store(true, Ordering::SeqCst);
    platform.set_endpoints(&key("slowpoke"), vec![named("slowpoke-1", app.addr)]);
    for pending in [pending, second] {
        let (status, body, _) = pending.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "warm"));
    }
    let m = h.metrics_text();
    assert_eq!(
        counter(&m, "zeroscale_activator_early_routes_total", "server_error"),
        1
    );
}

#[tokio::test]
async fn a_replica_whose_check_passes_then_fails_is_dropped_without_a_client_error() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("flaky", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let flaky = warming_backend("flaky").await;
    flaky.ready.store(true, Ordering::SeqCst);
    let steady = hello_backend("steady").await;

    let first = spawn_get(&h, "flaky.default");
    platform.wait_for_wakes(1).await;
    platform.set_candidates(
        &key("flaky"),
        vec![candidate(
            "flaky-1",
            flaky.addr,
            vec![http_check(flaky.addr, "/healthz")],
        )],
    );
    let (status, body, _) = first.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "flaky"));

    // Its check fails now, and so do its answers: a request sent before the activator's
    // next check gets a 503 there, which is replayed; after it, none is sent there.
    flaky.ready.store(false, Ordering::SeqCst);
    let second = spawn_get(&h, "flaky.default");
    eventually("the early route to be dropped", || {
        let m = h.metrics_text();
        counter(&m, "zeroscale_activator_early_routes_total", "check_failed")
            + counter(&m, "zeroscale_activator_early_routes_total", "server_error")
            == 1
    })
    .await;
    eventually("the request to wait", || h.queued("flaky") == 1).await;
    // It recovers: the activator's verdict on it stays (the platform decides now).
    flaky.ready.store(true, Ordering::SeqCst);
    let seen = flaky.requests.load(Ordering::SeqCst);
    platform.set_endpoints(&key("flaky"), vec![named("other", steady)]);
    let (status, body, _) = second.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "steady"));
    assert_eq!(flaky.requests.load(Ordering::SeqCst), seen);
}

#[tokio::test]
async fn a_replica_deleted_while_probed_is_never_used() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("gone", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let doomed = warming_backend("doomed").await;
    let other = hello_backend("other").await;

    let pending = spawn_get(&h, "gone.default");
    platform.wait_for_wakes(1).await;
    let mut pod = candidate(
        "gone-1",
        doomed.addr,
        vec![http_check(doomed.addr, "/healthz")],
    );
    platform.set_candidates(&key("gone"), vec![pod.clone()]);
    eventually("the pod to be probed", || {
        doomed.checks.load(Ordering::SeqCst) >= 2
    })
    .await;
    // Deleted (terminating first, then gone) while its check still fails; a second pod
    // (still warming) comes in the next set, so once it is probed, the deletion has been
    // taken in (the sets are handled in order).
    let witness = warming_backend("witness").await;
    pod.terminating = true;
    platform.set_candidates(&key("gone"), vec![pod]);
    platform.set_candidates(&key("gone"), vec![]);
    platform.set_candidates(
        &key("gone"),
        vec![candidate(
            "gone-3",
            witness.addr,
            vec![http_check(witness.addr, "/healthz")],
        )],
    );
    eventually("the witness to be probed", || {
        witness.checks.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Then its app comes up: it must not be probed or used any more (one check may have
    // been under way when its prober stopped).
    doomed.ready.store(true, Ordering::SeqCst);
    let checks = doomed.checks.load(Ordering::SeqCst);
    let witnessed = witness.checks.load(Ordering::SeqCst);
    eventually("the witness to be probed a few more times", || {
        witness.checks.load(Ordering::SeqCst) >= witnessed + 3
    })
    .await;
    assert!(
        doomed.checks.load(Ordering::SeqCst) <= checks + 1,
        "the prober stopped"
    );
    assert!(!pending.is_finished());

    platform.set_endpoints(&key("gone"), vec![named("gone-2", other)]);
    let (status, body, _) = pending.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "other"));
    assert_eq!(doomed.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_platforms_verdict_wins_once_it_has_listed_a_replica() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "judged",
        serde_json::json!({"timeouts": {"activation": "1s"}}),
    ));
    let h = start(platform.clone()).await;
    let pod = warming_backend("pod").await;
    pod.ready.store(true, Ordering::SeqCst);

    let first = spawn_get(&h, "judged.default");
    platform.wait_for_wakes(1).await;
    let c = candidate("judged-1", pod.addr, vec![http_check(pod.addr, "/healthz")]);
    platform.set_candidates(&key("judged"), vec![c.clone()]);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    // The slice lists it ready, then marks it not ready (its kubelet's probe failed).
    platform.set_endpoints(&key("judged"), vec![named("judged-1", pod.addr)]);
    assert_eq!(body_text(h.get("judged.default").await).await, "pod");
    platform.set_endpoints(&key("judged"), vec![]);

    // A request now wakes it again and the pod watch reopens: the pod still passes the
    // activator's own check, but the slice's verdict on it stands.
    let served = pod.requests.load(Ordering::SeqCst);
    let resp = h.get("judged.default").await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(platform.candidate_watches_opened(&key("judged")), 2);
    assert_eq!(pod.requests.load(Ordering::SeqCst), served);

    // A terminating pod is dropped at once, even while routed early.
    let second = warming_backend("second").await;
    second.ready.store(true, Ordering::SeqCst);
    let third = hello_backend("third").await;
    let pending = spawn_get(&h, "judged.default");
    let mut c2 = candidate("judged-2", second.addr, vec![tcp_check(second.addr)]);
    eventually("the pod watch to reopen", || {
        platform.candidate_watches(&key("judged")) == 1
    })
    .await;
    platform.set_candidates(&key("judged"), vec![c.clone(), c2.clone()]);
    assert_eq!(pending.await.unwrap().1, "second");
    c2.terminating = true;
    platform.set_candidates(&key("judged"), vec![c, c2]);
    eventually("the early route to be dropped", || {
        counter(
            &h.metrics_text(),
            "zeroscale_activator_early_routes_total",
            "terminating",
        ) == 1
    })
    .await;
    let pending = spawn_get(&h, "judged.default");
    eventually("the request to wait", || h.queued("judged") == 1).await;
    platform.set_endpoints(&key("judged"), vec![named("judged-3", third)]);
    assert_eq!(pending.await.unwrap().1, "third");
    assert_eq!(second.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn requests_that_cannot_be_replayed_wait_for_the_platform() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("posts", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let replica = hello_backend("answer").await;

    let post = {
        let client = h.client.clone();
        let req = h
            .request("posts.default", "/")
            .method("POST")
            .body(text("a body"))
            .unwrap();
        tokio::spawn(async move { body_text(client.request(req).await.unwrap()).await })
    };
    platform.wait_for_wakes(1).await;
    platform.set_candidates(
        &key("posts"),
        vec![candidate("posts-1", replica, vec![tcp_check(replica)])],
    );
    // A GET goes early; the POST waits for the platform.
    assert_eq!(body_text(h.get("posts.default").await).await, "answer");
    assert_eq!(h.queued("posts"), 1);
    platform.set_endpoints(&key("posts"), vec![named("posts-1", replica)]);
    assert_eq!(post.await.unwrap(), "answer");
}

#[tokio::test]
async fn a_replica_used_early_counts_in_its_drain() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("drained", serde_json::json!({})));
    let h = start(platform.clone()).await;
    // On its own loopback address: drains go by IP.
    let (addr, gate) = gated_backend_at("127.0.0.3", "slow").await;
    let held = spawn_get(&h, "drained.default");
    platform.wait_for_wakes(1).await;
    let mut pod = candidate("drained-1", addr, vec![tcp_check(addr)]);
    platform.set_candidates(&key("drained"), vec![pod.clone()]);
    eventually("the request to be in flight", || {
        h.activator.endpoint_in_flight(addr) == 1
    })
    .await;

    // Its pod is deleted while the request is in flight: the drain hook waits.
    platform.set_stopping(&key("drained"), vec![addr.ip()]);
    let drain = tokio::spawn({
        let req = h
            .request("10.96.0.20", "/.zeroscale/drain/default/drained")
            .body(empty())
            .unwrap();
        let client = h.client.clone();
        async move { body_text(client.request(req).await.unwrap()).await }
    });
    tokio::pin!(drain);
    pod.terminating = true;
    platform.set_candidates(&key("drained"), vec![pod]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut drain)
            .await
            .is_err(),
        "a request is in flight: the drain must wait"
    );
    gate.add_permits(1);
    assert_eq!(held.await.unwrap().1, "slow");
    let body = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain answers once the replica is idle")
        .unwrap();
    assert_eq!(body, "drained");
}

#[tokio::test]
async fn without_the_cold_start_probe_a_wake_waits_for_the_platform() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("plain", serde_json::json!({})));
    let h = start_with(
        platform.clone(),
        Settings {
            cold_start_probe: false,
            ..Settings::default()
        },
    )
    .await;
    let replica = hello_backend("plain").await;
    platform.set_candidates(
        &key("plain"),
        vec![candidate("plain-1", replica, vec![tcp_check(replica)])],
    );
    let pending = spawn_get(&h, "plain.default");
    platform.wait_for_wakes(1).await;
    eventually("the request to queue", || h.queued("plain") == 1).await;
    assert_eq!(platform.candidate_watches_opened(&key("plain")), 0);
    platform.set_endpoints(&key("plain"), vec![named("plain-1", replica)]);
    assert_eq!(pending.await.unwrap().1, "plain");
}

#[tokio::test]
async fn a_new_pod_that_takes_a_listed_pods_name_is_probed() {
    // A StatefulSet's pod comes back under its predecessor's name, at a new address: the
    // platform's verdict on the old one says nothing about it.
    let platform = MemoryPlatform::new();
    platform.apply_function(function("web", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let old = hello_backend("old").await;
    platform.set_endpoints(&key("web"), vec![named("web-0", old)]);
    assert_eq!(body_text(h.get("web.default").await).await, "old");
    platform.set_endpoints(&key("web"), vec![]);

    let pending = spawn_get(&h, "web.default");
    platform.wait_for_wakes(1).await;
    let new = hello_backend("new").await;
    platform.set_candidates(
        &key("web"),
        vec![candidate("web-0", new, vec![tcp_check(new)])],
    );
    let (status, body, cold) = pending.await.unwrap();
    assert_eq!((status, body.as_str(), cold), (StatusCode::OK, "new", true));
    assert!(platform.endpoints_of(&key("web")).is_empty());
}

#[tokio::test]
async fn a_woken_replica_listed_before_it_listens_is_waited_for_not_a_502() {
    // No readiness probe: the platform lists the pod ready as soon as its container runs,
    // before the app listens. A connect refused then means "not yet", not "gone".
    for probe in [true, false] {
        let platform = MemoryPlatform::new();
        platform.apply_function(function("bare", serde_json::json!({})));
        let h = start_with(
            platform.clone(),
            Settings {
                cold_start_probe: probe,
                ..Settings::default()
            },
        )
        .await;
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pending = spawn_get(&h, "bare.default");
        platform.wait_for_wakes(1).await;
        platform.set_endpoints(&key("bare"), vec![named("bare-1", addr)]);
        eventually("the request to leave the queue", || h.queued("bare") == 0).await;
        assert!(!pending.is_finished(), "it waits for the app to listen");
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(text("listening now")))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        let (status, body, cold) = pending.await.unwrap();
        assert_eq!(
            (status, body.as_str(), cold),
            (StatusCode::OK, "listening now", true),
            "cold_start_probe={probe}"
        );
    }
}

/// Load that keeps coming while the platform lags: replicas added one by one through the
/// fast path carry every request, for as long as the platform takes to list them (after
/// an API server outage that can be many seconds), and none is stuck or lost.
#[tokio::test]
async fn steady_load_through_early_replicas_while_the_platform_lags() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("lagging", serde_json::json!({})));
    let h = start(platform.clone()).await;
    let slow = || {
        backend(|_req| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(text("ok"))
        })
    };
    let first = slow().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (h.client.clone(), stop.clone());
        let base = h.request("lagging.default", "/").body(empty()).unwrap();
        let (uri, headers) = (base.uri().clone(), base.headers().clone());
        clients.push(tokio::spawn(async move {
            let mut answered = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let mut req = Request::get(uri.clone()).body(empty()).unwrap();
                *req.headers_mut() = headers.clone();
                let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
                    .await
                    .expect("an answer within 5 s")
                    .expect("the activator answers");
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(body_text(resp).await, "ok");
                answered += 1;
            }
            answered
        }));
    }
    platform.wait_for_wakes(1).await;
    let mut pods = vec![candidate("lagging-1", first, vec![tcp_check(first)])];
    platform.set_candidates(&key("lagging"), pods.clone());
    // The autoscaler adds replicas; the platform lists none of them for a while.
    for i in 2..=4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let addr = slow().await;
        pods.push(candidate(
            &format!("lagging-{i}"),
            addr,
            vec![tcp_check(addr)],
        ));
        platform.set_candidates(&key("lagging"), pods.clone());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let answered = c.await.expect("a client that never failed");
        assert!(answered > 10, "a client made little progress: {answered}");
    }
}

// ---------------------------------------------------------------- the fast lane

/// A replica speaking HTTP/1.1 by hand, so responses can be shaped as hyper would never
/// send them: each request gets the canned response its path names, and its head is
/// recorded (header lines with lower-cased names, sorted; then the body).
async fn scripted_replica(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    fn response(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        let canned: &[u8] = match path {
            "/cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Zeroscale-Cold-Start: true\r\nX-App: a\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\r\nhello",
            "/chunked" => b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-App: b\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            "/close" => b"HTTP/1.0 200 OK\r\nX-App: c\r\n\r\nuntil the replica closes",
            "/204" => b"HTTP/1.1 204 No Content\r\nX-App: d\r\n\r\n",
            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "/reason" => b"HTTP/1.1 299 Custom Thing\r\nContent-Length: 0\r\n\r\n",
            "/nodate" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            _ => {
                let mut echo = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                    .into_bytes();
                echo.extend_from_slice(body);
                return echo;
            }
        };
        if method == "HEAD" {
            let end = canned.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            return canned[..end].to_vec();
        }
        canned.to_vec()
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                // Reads until `done` holds of what was read; `false` once the peer is gone.
                async fn read_until(
                    stream: &mut TcpStream,
                    got: &mut Vec<u8>,
                    done: impl Fn(&[u8]) -> bool,
                ) -> bool {
                    let mut buf = vec![0u8; 4096];
                    while !done(got) {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                }
                loop {
                    let head_end = |g: &[u8]| g.windows(4).position(|w| w == b"\r\n\r\n");
                    if !read_until(&mut stream, &mut got, |g| head_end(g).is_some()).await {
                        return;
                    }
                    let end = head_end(&got).unwrap() + 4;
                    let head = String::from_utf8_lossy(&got[..end]).into_owned();
                    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
                    let first = lines.next().unwrap().to_string();
                    let mut headers: Vec<String> = lines
                        .map(|l| {
                            let (k, v) = l.split_once(':').unwrap();
                            format!("{}: {}", k.to_ascii_lowercase(), v.trim())
                        })
                        .collect();
                    headers.sort();
                    let chunked = headers.iter().any(|h| h == "transfer-encoding: chunked");
                    let length: usize = headers
                        .iter()
                        .find_map(|h| h.strip_prefix("content-length: "))
                        .map_or(0, |v| v.parse().unwrap());
                    let body = if chunked {
                        // Chunks as hyper sends them: no extensions, no trailers.
                        let last = |g: &[u8]| g[end..].windows(5).any(|w| w == b"0\r\n\r\n");
                        if !read_until(&mut stream, &mut got, last).await {
                            return;
                        }
                        let mut rest = &got[end..];
                        let mut body = Vec::new();
                        loop {
                            let line = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                            let size = usize::from_str_radix(
                                std::str::from_utf8(&rest[..line]).unwrap(),
                                16,
                            )
                            .unwrap();
                            rest = &rest[line + 2..];
                            if size == 0 {
                                rest = &rest[2..];
                                break;
                            }
                            body.extend_from_slice(&rest[..size]);
                            rest = &rest[size + 2..];
                        }
                        let used = got.len() - rest.len();
                        got.drain(..used);
                        body
                    } else {
                        if !read_until(&mut stream, &mut got, |g| g.len() >= end + length).await {
                            return;
                        }
                        let body = got[end..end + length].to_vec();
                        got.drain(..end + length);
                        body
                    };
                    let mut parts = first.split(' ');
                    let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                    seen.lock().unwrap().push(format!(
                        "{first}\n{}\n{}",
                        headers.join("\n"),
                        String::from_utf8_lossy(&body)
                    ));
                    if path == "/hang" {
                        // Never answers: the request timeout's 504.
                        futures::future::pending::<()>().await;
                    }
                    if stream
                        .write_all(&response(method, path, &body))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What a client sees of a response: status, reason, headers (lower-cased, sorted, the
/// date's value left out) and body.
async fn seen_by_client(resp: Response<Incoming>) -> String {
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_default();
    let mut headers: Vec<String> = resp
        .headers()
        .iter()
        .map(|(k, v)| match k.as_str() {
            "date" => "date: (present)".to_string(),
            _ => format!("{k}: {}", v.to_str().unwrap()),
        })
        .collect();
    headers.sort();
    let status = resp.status();
    let version = resp.version();
    let body = body_text(resp).await;
    let status = status.as_u16();
    format!(
        "{version:?} {status} {reason}\n{}\n{body}",
        headers.join("\n")
    )
}

/// Every exchange the fast lane takes, and a few it hands over, as replica and client
/// see them.
async fn exchanges(fast_lane: bool) -> (Vec<String>, Vec<String>, String) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let replica = scripted_replica(seen.clone()).await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function(
        "lane",
        serde_json::json!({"timeouts": {"request": "1s"}}),
    ));
    platform.set_endpoints(&key("lane"), vec![endpoint(replica)]);
    let h = start_with(
        platform,
        Settings {
            fast_lane,
            ..Settings::default()
        },
    )
    .await;
    let mut client_saw = Vec::new();
    let requests: Vec<Request<TestBody>> = vec![
        h.request("lane.default", "/cl")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-port", "81")
            .header("x-app", "kept")
            .header("connection", "keep-alive")
            .body(empty())
            .unwrap(),
        h.request("lane.default", "/chunked").body(empty()).unwrap(),
        h.request("lane.default", "/close").body(empty()).unwrap(),
        h.request("lane.default", "/204").body(empty()).unwrap(),
        h.request("lane.default", "/early").body(empty()).unwrap(),
        h.request("lane.default", "/reason").body(empty()).unwrap(),
        h.request("lane.default", "/nodate?q=1&r=%20")
            .body(empty())
            .unwrap(),
        h.request("lane.default", "/hang").body(empty()).unwrap(),
        Request::head(format!("http://{}/cl", h.addr))
            .header("host", "lane.default")
            .body(empty())
            .unwrap(),
        Request::post(format!("http://{}/echo", h.addr))
            .header("host", "LANE.default.svc.cluster.local.")
            .body(text("a body"))
            .unwrap(),
        // Not the lane's: an X-Zeroscale header and a chunked body go through hyper.
        h.request("lane.default", "/cl")
            .header("x-zeroscale-cold-start", "true")
            .body(empty())
            .unwrap(),
        Request::post(format!("http://{}/echo", h.addr))
            .header("host", "lane.default")
            .body(BoxBody::new(StreamBody::new(futures::stream::iter([
                Ok::<_, BoxError>(Frame::data(Bytes::from("streamed"))),
            ]))))
            .unwrap(),
    ];
    for req in requests {
        client_saw.push(seen_by_client(h.send(req).await).await);
    }
    let handoffs = h
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("zeroscale_activator_lane_handoffs_total{"))
        .collect::<Vec<_>>()
        .join("\n");
    let replica_saw = seen.lock().unwrap().clone();
    (replica_saw, client_saw, handoffs)
}

/// The fast lane is an optimisation, not a second behaviour: replica and client see the
/// same exchanges through it as through hyper, for every response framing (length,
/// chunked, until close, none), 1xx responses, HEAD, odd reasons, a response without a
/// date, hop-by-hop headers both ways, spoofed forwarding headers, and the answer when
/// the replica does not answer in time.
#[tokio::test]
async fn the_fast_lane_and_hyper_give_the_same_exchanges() {
    let (lane_replica, lane_client, handoffs) = exchanges(true).await;
    let (full_replica, full_client, none) = exchanges(false).await;
    assert_eq!(lane_replica, full_replica);
    assert_eq!(lane_client, full_client);
    assert!(none.is_empty(), "{none}");
    // The lane took every request until the first with an X-Zeroscale header; the
    // client's pool may have opened a second connection on the way.
    assert!(
        handoffs.contains(r#"reason="headers""#),
        "handoffs: {handoffs}"
    );
    // And for no other reason: the rest were the lane's to serve.
    assert!(
        handoffs.lines().all(|l| l.contains(r#"reason="headers""#)),
        "{handoffs}"
    );
    // What the lane's own path did, spelled out once.
    assert!(
        lane_replica[0].contains("x-forwarded-for: 127.0.0.1"),
        "{}",
        lane_replica[0]
    );
    assert!(lane_replica[0].contains("x-forwarded-host: lane.default"));
    assert!(lane_replica[0].contains("x-forwarded-port: 81"));
    assert!(!lane_replica[0].contains("connection"));
    assert!(!lane_client[0].contains("x-hop"), "{}", lane_client[0]);
    assert!(!lane_client[0].contains("x-zeroscale"));
    assert!(
        lane_client[1].ends_with("hello world"),
        "{}",
        lane_client[1]
    );
    assert!(lane_client[2].ends_with("until the replica closes"));
    assert!(lane_client[2].starts_with("HTTP/1.1 200"));
    assert!(lane_client[5].starts_with("HTTP/1.1 299 Custom Thing"));
    assert!(lane_client[6].contains("date: (present)"));
    assert!(
        lane_client[7].starts_with("HTTP/1.1 504"),
        "{}",
        lane_client[7]
    );
    assert!(lane_client[9].ends_with("a body"));
}

/// One connection, requests pipelined in one write: the lane serves the first, hands the
/// connection to hyper at the chunked upload (with the bytes it had read past it), and
/// hyper answers that one and the next, all in order.
#[tokio::test]
async fn a_connection_leaves_the_fast_lane_at_the_request_that_needs_hyper() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let replica = scripted_replica(seen.clone()).await;
    let platform = MemoryPlatform::new();
    platform.apply_function(function("lane", serde_json::json!({})));
    platform.set_endpoints(&key("lane"), vec![endpoint(replica)]);
    let h = start(platform).await;
    let out = raw_exchange(
        h.addr,
        b"GET /nodate HTTP/1.1\r\nHost: lane.default\r\n\r\n\
          GET /cl HTTP/1.1\r\nHost: lane.default\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: lane.default\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /nodate HTTP/1.1\r\nHost: lane.default\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    // Each response: its status line and its body (what follows the blank line).
    let responses: Vec<(&str, &str)> = out
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            let (head, body) = r.split_once("\r\n\r\n").unwrap();
            (head.lines().next().unwrap(), body)
        })
        .collect();
    let expected = [
        ("200 OK", "abc"),
        ("200 OK", "hello"),
        ("200 OK", "abc"),
        ("200 OK", "abc"),
    ];
    assert_eq!(responses, expected, "{out}");
    let replica_saw = seen.lock().unwrap().clone();
    assert_eq!(replica_saw.len(), 4);
    assert!(replica_saw[2].ends_with("abc"), "{}", replica_saw[2]);
    let metrics = h.metrics_text();
    assert!(
        metrics.contains(r#"zeroscale_activator_lane_handoffs_total{reason="headers"} 1"#),
        "{metrics}"
    );
}

/// A keep-alive connection whose first request wakes a Function from zero stays in the
/// fast lane: the full proxy serves the cold request on it (queue, wake, the cold-start
/// mark), and the warm ones after it go the fast way; nothing is handed to hyper.
#[tokio::test]
async fn a_cold_start_does_not_take_a_connection_out_of_the_fast_lane() {
    let platform = MemoryPlatform::new();
    platform.apply_function(function("cold", serde_json::json!({})));
    let h = start(platform).await;
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = || {
        Request::get("/")
            .header("host", "cold.default")
            .body(empty())
            .unwrap()
    };
    let first = send.send_request(request());
    let wake = async {
        h.platform.wait_for_wakes(1).await;
        let replica = hello_backend("awake").await;
        h.platform
            .set_endpoints(&key("cold"), vec![endpoint(replica)]);
    };
    let (resp, ()) = tokio::join!(first, wake);
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-zeroscale-cold-start"], "true");
    assert_eq!(body_text(resp).await, "awake");
    for _ in 0..3 {
        let resp = send.send_request(request()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("x-zeroscale-cold-start").is_none());
        assert_eq!(body_text(resp).await, "awake");
    }
    let metrics = h.metrics_text();
    assert!(
        metrics
            .contains(r#"zeroscale_activator_lane_full_path_requests_total{reason="replica"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("zeroscale_activator_lane_handoffs_total{"),
        "{metrics}"
    );
    assert_eq!(h.stats("cold").unwrap().requests_total, 4);
}
