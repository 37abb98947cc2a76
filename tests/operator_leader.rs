//! Leader election hand-over on a fake Lease store with tokio's paused clock: one leader
//! at a time, failover within the lease duration when the leader vanishes, a leader that
//! cannot renew steps down before anyone else takes over, and a release on shutdown
//! hands over at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use zeroscale::operator::leader::{Elector, LeaseError, LeaseStore, Timing};

/// One Lease shared by several candidates, with resourceVersion checks like the API
/// server's; each candidate's handle can be cut off (a network partition).
#[derive(Default)]
struct Shared {
    lease: Option<Lease>,
    version: u64,
}

#[derive(Clone)]
struct FakeStore {
    shared: Arc<Mutex<Shared>>,
    partitioned: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeStore {
    fn new(shared: &Arc<Mutex<Shared>>) -> Self {
        Self {
            shared: shared.clone(),
            partitioned: Arc::default(),
        }
    }
    fn cut(&self) {
        self.partitioned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn check(&self) -> Result<(), LeaseError> {
        if self.partitioned.load(std::sync::atomic::Ordering::SeqCst) {
            Err(LeaseError::Api(kube::Error::Service("partitioned".into())))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl LeaseStore for FakeStore {
    async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.check()?;
        Ok(self.shared.lock().unwrap().lease.clone())
    }
    async fn create(&self, mut lease: Lease) -> Result<Lease, LeaseError> {
        self.check()?;
        let mut s = self.shared.lock().unwrap();
        if s.lease.is_some() {
            return Err(LeaseError::Conflict);
        }
        s.version += 1;
        lease.metadata.resource_version = Some(s.version.to_string());
        s.lease = Some(lease.clone());
        Ok(lease)
    }
    async fn replace(&self, mut lease: Lease) -> Result<Lease, LeaseError> {
        self.check()?;
        let mut s = self.shared.lock().unwrap();
        let current = s
            .lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone());
        if current != lease.metadata.resource_version {
            return Err(LeaseError::Conflict);
        }
        s.version += 1;
        lease.metadata.resource_version = Some(s.version.to_string());
        s.lease = Some(lease.clone());
        Ok(lease)
    }
}

struct Candidate {
    store: FakeStore,
    leading: watch::Receiver<bool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(shared: &Arc<Mutex<Shared>>, identity: &str) -> Candidate {
    let store = FakeStore::new(shared);
    let (tx, leading) = watch::channel(false);
    let stop = CancellationToken::new();
    let elector = Elector::new(store.clone(), identity, Timing::default());
    let task = tokio::spawn(elector.run(tx, stop.clone()));
    Candidate {
        store,
        leading,
        stop,
        task,
    }
}

/// Fails the test if two candidates ever lead at once.
fn watch_for_split_brain(a: &Candidate, b: &Candidate) -> tokio::task::JoinHandle<()> {
    let mut a = a.leading.clone();
    let mut b = b.leading.clone();
    tokio::spawn(async move {
        loop {
            assert!(!(*a.borrow() && *b.borrow()), "two leaders at once");
            tokio::select! {
                r = a.changed() => if r.is_err() { return },
                r = b.changed() => if r.is_err() { return },
            }
        }
    })
}

async fn assert_no_split_brain(guard: tokio::task::JoinHandle<()>) {
    guard.abort();
    if let Err(e) = guard.await {
        assert!(!e.is_panic(), "two candidates led at the same time");
    }
}

async fn becomes(c: &mut Candidate, leading: bool, within: Duration) -> Duration {
    let started = Instant::now();
    timeout(within, c.leading.wait_for(|l| *l == leading))
        .await
        .unwrap_or_else(|_| panic!("did not become leading={leading} within {within:?}"))
        .expect("elector alive");
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn one_leader_and_failover_within_the_lease_duration() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut a = start(&shared, "operator-a");
    becomes(&mut a, true, Duration::from_secs(1)).await;
    let mut b = start(&shared, "operator-b");
    let guard = watch_for_split_brain(&a, &b);

    // B stays a standby while A renews.
    assert!(
        timeout(Duration::from_secs(60), b.leading.wait_for(|l| *l))
            .await
            .is_err(),
        "the standby must not take a renewed lease"
    );
    assert!(*a.leading.borrow());

    // A loses the API server: it steps down within the renew deadline...
    let cut = Instant::now();
    a.store.cut();
    becomes(&mut a, false, Duration::from_secs(12)).await;
    // ...and B takes over within the lease duration (plus a retry period), never while
    // A still leads (the guard task checks every change).
    becomes(&mut b, true, Duration::from_secs(20)).await;
    let failover = cut.elapsed();
    assert!(
        failover <= Duration::from_secs(15 + 2 + 2),
        "failover took {failover:?}"
    );
    let lease = shared.lock().unwrap().lease.clone().unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("operator-b"));
    assert_eq!(spec.lease_transitions, Some(1));

    b.stop.cancel();
    a.stop.cancel();
    let _ = b.task.await;
    let _ = a.task.await;
    assert_no_split_brain(guard).await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_shuts_down_hands_over_at_once() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut a = start(&shared, "operator-a");
    becomes(&mut a, true, Duration::from_secs(1)).await;
    let mut b = start(&shared, "operator-b");
    let guard = watch_for_split_brain(&a, &b);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(!*b.leading.borrow());

    // SIGTERM on A: it stops leading and releases the lease.
    a.stop.cancel();
    a.task.await.unwrap();
    assert!(!*a.leading.borrow());
    let released = shared.lock().unwrap().lease.clone().unwrap();
    assert_eq!(released.spec.unwrap().holder_identity, None);

    // B does not wait out the lease duration: one retry period is enough.
    let took = becomes(&mut b, true, Duration::from_secs(3)).await;
    assert!(took <= Duration::from_secs(3));
    b.stop.cancel();
    let _ = b.task.await;
    assert_no_split_brain(guard).await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_by_a_dead_process_is_taken_after_it_expires() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    // A leader that died without releasing (no task renews it any more).
    let mut a = start(&shared, "operator-a");
    becomes(&mut a, true, Duration::from_secs(1)).await;
    a.task.abort();

    let mut b = start(&shared, "operator-b");
    let took = becomes(&mut b, true, Duration::from_secs(20)).await;
    assert!(
        took >= Duration::from_secs(15),
        "a lease is honoured for its whole duration, took over after {took:?}"
    );
    b.stop.cancel();
    let _ = b.task.await;
}

/// The Lease as the API server sees it: created on first acquire, then replaced with
/// its resourceVersion; a 409 is a lost race, not an error to retry blindly.
#[tokio::test]
async fn the_kube_lease_store_creates_then_replaces_with_the_version() {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use zeroscale::operator::leader::KubeLeaseStore;

    let calls: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = calls.clone();
    tokio::spawn(async move {
        let mut stored: Option<Value> = None;
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            seen.lock()
                .unwrap()
                .push((method.clone(), path.clone(), body.clone()));
            let (code, reply) = match (method.as_str(), &stored) {
                ("GET", None) => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                ("GET", Some(l)) => (200, l.clone()),
                ("POST", _) => {
                    let mut l = body.clone();
                    l["metadata"]["resourceVersion"] = json!("1");
                    stored = Some(l.clone());
                    (201, l)
                }
                ("PUT", Some(l))
                    if body["metadata"]["resourceVersion"] == l["metadata"]["resourceVersion"] =>
                {
                    let mut next = body.clone();
                    next["metadata"]["resourceVersion"] = json!("2");
                    stored = Some(next.clone());
                    (200, next)
                }
                _ => (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "Conflict", "code": 409, "message": "modified"}),
                ),
            };
            send.send_response(
                Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = kube::Client::new(service, "default");
    let store = KubeLeaseStore::new(client, "zeroscale-system", "zeroscale-operator");
    let mut elector = Elector::new(store, "operator-a", Timing::default());
    assert!(elector.try_acquire_or_renew(Instant::now()).await.unwrap());
    assert!(elector.try_acquire_or_renew(Instant::now()).await.unwrap());
    let calls = calls.lock().unwrap();
    let methods: Vec<&str> = calls.iter().map(|(m, _, _)| m.as_str()).collect();
    assert_eq!(methods, vec!["GET", "POST", "GET", "PUT"]);
    let (_, path, created) = &calls[1];
    assert_eq!(
        path,
        "/apis/coordination.k8s.io/v1/namespaces/zeroscale-system/leases"
    );
    assert_eq!(created["metadata"]["name"], "zeroscale-operator");
    assert_eq!(created["spec"]["holderIdentity"], "operator-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    let (_, path, renewed) = &calls[3];
    assert_eq!(
        path,
        "/apis/coordination.k8s.io/v1/namespaces/zeroscale-system/leases/zeroscale-operator"
    );
    assert_eq!(
        renewed["metadata"]["resourceVersion"], "1",
        "optimistic concurrency"
    );
}
