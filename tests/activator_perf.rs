//! A quick throughput check (ignored by default; timing claims belong to benchmarks):
//! 64 keep-alive clients against a tiny backend, directly and through the activator.
//! Run with `cargo test --release --test activator_perf -- --ignored --nocapture`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroscale::activator::{Activator, Settings};
use zeroscale::api::{Function, FunctionKey, FunctionSpec};
use zeroscale::platform::Endpoint;
use zeroscale::platform::memory::MemoryPlatform;

const CONCURRENCY: usize = 64;
const DURATION: Duration = Duration::from_secs(5);

static BACKEND_CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            BACKEND_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"hello, world\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Requests per second and p50/p99 latency of `CONCURRENCY` keep-alive clients.
async fn load(addr: SocketAddr, host: &'static str) -> (f64, Duration, Duration) {
    let deadline = Instant::now() + DURATION;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::with_capacity(100_000);
            while Instant::now() < deadline {
                let start = Instant::now();
                let req = Request::get("/")
                    .header("host", host)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert!(resp.status().is_success());
                resp.into_body().collect().await.unwrap();
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (all.len() as f64 / DURATION.as_secs_f64(), p(0.5), p(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test; run by hand"]
async fn throughput_direct_and_through_the_activator() {
    let replica = backend().await;
    let platform = MemoryPlatform::new();
    let spec: FunctionSpec = serde_json::from_value(
        serde_json::json!({"template": {"spec": {"containers": [{"name": "app"}]}}}),
    )
    .unwrap();
    let mut f = Function::new("bench", spec);
    f.metadata.namespace = Some("default".into());
    platform.apply_function(f);
    platform.set_endpoints(
        &FunctionKey::new("default", "bench"),
        vec![Endpoint {
            addr: replica,
            name: "bench-1".into(),
        }],
    );
    let registry = prometheus::Registry::new();
    let activator = Activator::new(platform, Settings::default(), &registry).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(activator.clone().run(listener, shutdown.clone()));
    activator.synced().await;

    if std::env::var_os("PERF_SKIP_DIRECT").is_none() {
        let (rps, p50, p99) = load(replica, "bench.default").await;
        println!("direct:           {rps:>9.0} req/s  p50 {p50:?}  p99 {p99:?}");
    }
    let (rps, p50, p99) = load(addr, "bench.default").await;
    println!("via activator:    {rps:>9.0} req/s  p50 {p50:?}  p99 {p99:?}");
    println!(
        "backend connections accepted: {}",
        BACKEND_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed)
    );
    shutdown.cancel();
}
