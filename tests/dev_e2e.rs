//! End to end through the real binary: `zeroscale dev` with Functions whose replicas are
//! python3 processes, called over real HTTP. Each test runs its own `dev` with its own
//! manifests and checks what a client and a developer see: cold starts, warm requests,
//! scale to zero and back, scaling with load, the queue limit, activation timeouts,
//! crash loops, drains, live edits and a clean exit.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::{alive, eventually, free_port, get, group_members, manifest, server_container};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(30);
const COLD_START: &str = "x-zeroscale-cold-start";

/// A running `zeroscale dev` over the manifests in its own directory.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Dev {
    /// Starts dev over `files` (name, YAML), written next to `server.py`.
    async fn start(files: &[(&str, String)]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        support::write_server(dir.path());
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let manifests = dir.path().to_path_buf();
        Self::start_on(dir, &manifests).await
    }

    /// Starts dev over `manifests`, logging into `dir`.
    async fn start_on(dir: tempfile::TempDir, manifests: &Path) -> Dev {
        let log = dir.path().join("dev.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(env!("CARGO_BIN_EXE_zeroscale"))
            .arg("dev")
            .arg("-f")
            .arg(manifests)
            .args(["--listen", &listen.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut dev = Dev {
            child,
            dir,
            listen,
            admin,
            log,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = dev.child.try_wait().unwrap() {
                panic!("dev exited at start ({status}):\n{}", dev.log());
            }
            let admin_ok =
                matches!(get(dev.admin, "admin", "/functions").await, Ok(r) if r.status == 200);
            if admin_ok && tokio::net::TcpStream::connect(dev.listen).await.is_ok() {
                return dev;
            }
            assert!(
                Instant::now() < deadline,
                "dev did not start serving in {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A request to Function `name` in `default`.
    async fn call(&self, name: &str, path: &str) -> support::Reply {
        get(self.listen, &format!("{name}.default"), path)
            .await
            .unwrap_or_else(|e| panic!("calling {name}{path}: {e}"))
    }

    /// The Function as `/functions` shows it.
    async fn function(&self, name: &str) -> Value {
        let reply = get(self.admin, "admin", "/functions").await.unwrap();
        let all: Value = serde_json::from_str(&reply.body).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    async fn pids(&self, name: &str) -> Vec<u32> {
        let f = self.function(name).await;
        f["processes"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `name` has exactly `n` replica processes, all ready.
    async fn replicas(&self, name: &str, n: usize) -> Vec<u32> {
        eventually(&format!("{n} ready replicas of {name}"), LIMIT, || async {
            let f = self.function(name).await;
            let ps = f["processes"].as_array()?.clone();
            let all_ready = ps.iter().all(|p| p["state"] == "ready");
            (ps.len() == n && all_ready && f["ready"] == n).then(|| {
                ps.iter()
                    .filter_map(|p| p["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
        })
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- dev log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn server(name: &str, spec: &str) -> String {
    manifest(name, &server_container(&[]), spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_warm_requests_idle_to_zero_and_wake_again() {
    let dev = Dev::start(&[(
        "hello.yaml",
        server("hello", "scale: {max: 2, idleTimeout: 1s}"),
    )])
    .await;
    assert!(
        dev.pids("hello").await.is_empty(),
        "started before any request"
    );

    let cold = dev.call("hello", "/").await;
    assert_eq!(cold.status, 200, "{}", cold.body);
    assert_eq!(
        cold.headers.get(COLD_START).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert!(cold.body.contains("host=hello-0"), "{}", cold.body);

    let warm = dev.call("hello", "/").await;
    assert_eq!(warm.status, 200);
    assert!(
        warm.headers.get(COLD_START).is_none(),
        "warm request marked cold"
    );
    let first = dev.pids("hello").await;
    assert_eq!(first.len(), 1);

    // Idle for longer than idleTimeout: back to zero, the process gone.
    eventually("scale to zero", LIMIT, || async {
        let f = dev.function("hello").await;
        (f["desired"] == 0 && f["processes"].as_array()?.is_empty()).then_some(())
    })
    .await;
    assert!(!alive(first[0]), "the replica outlived the scale to zero");

    let again = dev.call("hello", "/").await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.headers.get(COLD_START).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_load_brings_more_replicas() {
    let spec = "scale: {max: 4, target: 1, utilization: 100, window: 6s, idleTimeout: 3s}";
    let dev = Dev::start(&[("load.yaml", server("load", spec))]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let stop = stop.clone();
        let listen = dev.listen;
        clients.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while !stop.is_cancelled() {
                match get(listen, "load.default", "/?delay=0.3").await {
                    Ok(r) => codes.push(r.status),
                    Err(e) => panic!("request failed: {e}"),
                }
            }
            codes
        }));
    }
    let most = eventually("more than one ready replica under load", LIMIT, || async {
        let ready = dev.function("load").await["ready"].as_u64()?;
        (ready >= 2).then_some(ready)
    })
    .await;
    stop.cancel();
    let mut codes = Vec::new();
    for c in clients {
        codes.extend(c.await.unwrap());
    }
    assert!(most <= 4, "above max: {most}");
    assert!(
        codes.iter().all(|c| *c == 200),
        "errors under load: {codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gives_503_with_retry_after() {
    let spec = "scale: {max: 1, containerConcurrency: 1, idleTimeout: 30s}\nqueue: {capacity: 1}";
    let dev = Dev::start(&[("busy.yaml", server("busy", spec))]).await;
    assert_eq!(dev.call("busy", "/").await.status, 200, "warm-up");
    let mut calls = Vec::new();
    for _ in 0..4 {
        let listen = dev.listen;
        calls.push(tokio::spawn(async move {
            get(listen, "busy.default", "/?delay=2").await.unwrap()
        }));
    }
    let mut replies = Vec::new();
    for c in calls {
        replies.push(c.await.unwrap());
    }
    let shed: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert!(!shed.is_empty(), "no request was refused: {replies:?}");
    assert!(served >= 1, "nothing was served: {replies:?}");
    assert!(
        shed.iter()
            .all(|r| r.headers.contains_key(http::header::RETRY_AFTER)),
        "503 without Retry-After: {shed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_becomes_ready_gives_504() {
    let container = "command: [python3, -c, \"import time; time.sleep(600)\"]";
    let dev = Dev::start(&[(
        "mute.yaml",
        manifest("mute", container, "timeouts: {activation: 1s}"),
    )])
    .await;
    let started = Instant::now();
    let reply = dev.call("mute", "/").await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_function_gives_503_with_the_reason() {
    let container = "command: [python3, -c, \"import sys; print('boom: missing DATABASE_URL', file=sys.stderr); sys.exit(3)\"]";
    let dev = Dev::start(&[(
        "crashy.yaml",
        manifest("crashy", container, "timeouts: {activation: 60s}"),
    )])
    .await;
    let started = Instant::now();
    let reply = dev.call("crashy", "/").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("CrashLoop"), "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the queued request waited for the activation timeout instead of failing fast"
    );
    // New requests fail at once, with the replica's last words.
    let again = dev.call("crashy", "/").await;
    assert_eq!(again.status, 503);
    assert!(
        again.body.contains("boom: missing DATABASE_URL"),
        "{}",
        again.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_when_scale_down_begins_complete() {
    let dev = Dev::start(&[(
        "steady.yaml",
        server("steady", "scale: {min: 2, max: 2, idleTimeout: 30s}"),
    )])
    .await;
    dev.replicas("steady", 2).await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let listen = dev.listen;
        calls.push(tokio::spawn(async move {
            get(listen, "steady.default", "/?delay=3").await
        }));
    }
    eventually("every request to reach a replica", LIMIT, || async {
        (dev.log().matches("started /?delay=3").count() >= 4).then_some(())
    })
    .await;
    // Editing the manifest scales the Function down while the requests run.
    std::fs::write(
        dev.path().join("steady.yaml"),
        server("steady", "scale: {min: 1, max: 1, idleTimeout: 30s}"),
    )
    .unwrap();
    for c in calls {
        let reply = c.await.unwrap().expect("the request was cut");
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    dev.replicas("steady", 1).await;
    assert!(
        dev.log()
            .contains("waiting for in-flight requests before stopping"),
        "the stopped replica had no request to drain; the test proved nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_edits_apply_and_invalid_ones_are_skipped() {
    let dev = Dev::start(&[
        ("a.yaml", server("alpha", "scale: {idleTimeout: 30s}")),
        ("bad.yaml", server("beta", "scale: {min: 3, max: 1}")),
    ])
    .await;
    eventually(
        "the invalid manifest to be reported with its field",
        LIMIT,
        || async { dev.log().contains("spec.scale.min").then_some(()) },
    )
    .await;
    assert_eq!(dev.call("alpha", "/").await.status, 200);
    assert_eq!(dev.call("beta", "/").await.status, 404);

    // Fixing it makes it routable.
    std::fs::write(
        dev.path().join("bad.yaml"),
        server("beta", "scale: {max: 1}"),
    )
    .unwrap();
    eventually("the fixed Function", LIMIT, || async {
        (dev.call("beta", "/").await.status == 200).then_some(())
    })
    .await;

    // A template change replaces the replica.
    let old = dev.replicas("alpha", 1).await;
    let v2 = manifest(
        "alpha",
        &server_container(&[("VERSION", "2")]),
        "scale: {idleTimeout: 30s}",
    );
    std::fs::write(dev.path().join("a.yaml"), v2).unwrap();
    eventually("the replaced replica", LIMIT, || async {
        let f = dev.function("alpha").await;
        let ps = f["processes"].as_array()?.clone();
        (ps.len() == 1 && ps[0]["revision"] == 2 && ps[0]["state"] == "ready").then_some(())
    })
    .await;
    assert!(!alive(old[0]));
    assert_eq!(dev.call("alpha", "/").await.status, 200);

    // A broken edit keeps the running version.
    std::fs::write(dev.path().join("a.yaml"), "kind: [unclosed").unwrap();
    eventually("the YAML error to be reported", LIMIT, || async {
        dev.log().contains("not valid YAML").then_some(())
    })
    .await;
    assert_eq!(dev.call("alpha", "/").await.status, 200);

    // Deleting the file deletes the Function and stops its replica.
    let beta = dev.pids("beta").await;
    std::fs::remove_file(dev.path().join("bad.yaml")).unwrap();
    eventually("the deleted Function to stop", LIMIT, || async {
        (dev.function("beta").await.is_null() && beta.iter().all(|p| !alive(*p))).then_some(())
    })
    .await;
    assert_eq!(dev.call("beta", "/").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_dev_and_every_replica() {
    // One replica starts a child of its own; it must not survive either.
    let forking =
        "command: [sh, -c, \"python3 -c 'import time; time.sleep(600)' & exec python3 server.py\"]";
    let mut dev = Dev::start(&[
        ("one.yaml", server("one", "scale: {min: 2, max: 2}")),
        (
            "two.yaml",
            manifest("two", forking, "scale: {min: 1, max: 1}"),
        ),
    ])
    .await;
    let mut groups = dev.replicas("one", 2).await;
    groups.extend(dev.replicas("two", 1).await);
    let pid = dev.child.id().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(LIMIT, dev.child.wait())
        .await
        .expect("dev exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "dev exited with {status}");
    eventually(
        "every replica's process group to be gone",
        Duration::from_secs(5),
        || async {
            groups
                .iter()
                .all(|g| group_members(*g).is_empty())
                .then_some(())
        },
    )
    .await;
    assert!(dev.log().contains("all replicas stopped"));
}

#[tokio::test]
async fn a_missing_manifest_path_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_zeroscale"))
        .args([
            "dev",
            "-f",
            "/nonexistent/zeroscale/fns.yaml",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/zeroscale/fns.yaml"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_die_with_dev_even_when_it_is_sigkilled() {
    let mut dev = Dev::start(&[("one.yaml", server("one", "scale: {min: 2, max: 2}"))]).await;
    let replicas = dev.replicas("one", 2).await;
    dev.child.start_kill().unwrap();
    dev.child.wait().await.unwrap();
    eventually(
        "the replicas to die with dev",
        Duration::from_secs(5),
        || async { replicas.iter().all(|p| !alive(*p)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_serves_the_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dev = Dev::start_on(tempfile::tempdir().unwrap(), &examples).await;
    let hello = dev.call("hello", "/").await;
    assert_eq!(hello.status, 200, "{}", hello.body);
    assert!(hello.headers.contains_key(COLD_START));
    let slow = dev.call("slow", "/").await;
    assert_eq!(slow.status, 200, "{}", slow.body);
    assert!(
        slow.body.starts_with("slow reply from slow-0"),
        "{}",
        slow.body
    );
}
