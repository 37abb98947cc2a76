//! The Kubernetes platform's write calls against a scripted API server: wakes use the
//! scale subresource with optimistic concurrency and never fight a concurrent wake, the
//! autoscaler's scale changes honour an expected version, and its status fields go
//! through server-side apply under their own field manager.

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use zeroscale::api::FunctionKey;
use zeroscale::platform::kube::KubePlatform;
use zeroscale::platform::{AutoscalerStatus, Platform, PlatformError, WakeOutcome};

const SCALE: &str = "/apis/apps/v1/namespaces/default/deployments/hello/scale";

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    body: Value,
}

type Script = Box<dyn FnMut(&Call) -> (u16, Value) + Send>;

/// A platform whose API requests `script` answers; returns the calls made.
fn platform(mut script: Script) -> (KubePlatform, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let call = Call {
                method: request.method().to_string(),
                path: request.uri().path().to_string(),
                query: request.uri().query().unwrap_or_default().to_string(),
                body: {
                    let bytes = request
                        .into_body()
                        .collect_bytes()
                        .await
                        .unwrap_or_default();
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                },
            };
            let (code, reply) = if call.path.contains("/events") {
                (201, call.body.clone())
            } else {
                script(&call)
            };
            seen.lock().unwrap().push(call);
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
    (KubePlatform::new(client, None), calls)
}

fn scale(replicas: i32, version: &str) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "hello", "namespace": "default", "resourceVersion": version},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

fn conflict() -> (u16, Value) {
    (
        409,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
               "code": 409, "message": "the object has been modified"}),
    )
}

fn key() -> FunctionKey {
    FunctionKey::new("default", "hello")
}

#[tokio::test]
async fn wake_sets_replicas_from_zero_with_the_read_version() {
    let (p, calls) = platform(Box::new(|c| match c.method.as_str() {
        "GET" => (200, scale(0, "7")),
        _ => (200, c.body.clone()),
    }));
    assert_eq!(p.wake(&key(), 2).await.unwrap(), WakeOutcome::Woken);
    let calls = calls.lock().unwrap();
    let put = calls.iter().find(|c| c.method == "PUT").expect("a replace");
    assert_eq!(put.path, SCALE);
    assert_eq!(put.body["spec"]["replicas"], 2);
    assert_eq!(
        put.body["metadata"]["resourceVersion"], "7",
        "optimistic concurrency"
    );
}

#[tokio::test]
async fn a_woken_function_is_not_touched_again() {
    let (p, calls) = platform(Box::new(|_| (200, scale(3, "9"))));
    assert_eq!(p.wake(&key(), 1).await.unwrap(), WakeOutcome::AlreadyAwake);
    assert!(calls.lock().unwrap().iter().all(|c| c.method == "GET"));
}

#[tokio::test]
async fn a_concurrent_wake_is_not_an_error() {
    // Another activator wins the race: our write conflicts, the re-read shows replicas.
    let mut reads = 0;
    let (p, calls) = platform(Box::new(move |c| match c.method.as_str() {
        "GET" => {
            reads += 1;
            if reads == 1 {
                (200, scale(0, "7"))
            } else {
                (200, scale(1, "8"))
            }
        }
        _ => conflict(),
    }));
    assert_eq!(p.wake(&key(), 1).await.unwrap(), WakeOutcome::AlreadyAwake);
    assert_eq!(
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == "PUT")
            .count(),
        1
    );
}

#[tokio::test]
async fn set_scale_with_a_stale_version_is_a_conflict() {
    let (p, _) = platform(Box::new(|_| conflict()));
    let err = p
        .set_scale(&key(), 4, Some("6"), "load")
        .await
        .expect_err("stale version");
    assert!(matches!(err, PlatformError::Conflict(_)), "{err}");
}

#[tokio::test]
async fn set_scale_records_an_event_with_the_reason() {
    let (p, calls) = platform(Box::new(|c| (200, c.body.clone())));
    p.set_scale(&key(), 0, Some("6"), "idle for 30s")
        .await
        .unwrap();
    let calls = calls.lock().unwrap();
    let put = calls.iter().find(|c| c.method == "PUT").unwrap();
    assert_eq!(put.body["spec"]["replicas"], 0);
    assert_eq!(put.body["metadata"]["resourceVersion"], "6");
    let event = calls
        .iter()
        .find(|c| c.path.contains("/events"))
        .expect("an Event");
    assert!(
        event.body["note"]
            .as_str()
            .unwrap()
            .contains("idle for 30s")
    );
    assert_eq!(event.body["regarding"]["kind"], "Function");
    assert_eq!(event.body["regarding"]["name"], "hello");
}

#[tokio::test]
async fn a_missing_deployment_is_not_found() {
    let (p, _) = platform(Box::new(|_| {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }));
    assert!(matches!(
        p.wake(&key(), 1).await,
        Err(PlatformError::NotFound(_))
    ));
    assert!(matches!(
        p.scale(&key()).await,
        Err(PlatformError::NotFound(_))
    ));
}

#[tokio::test]
async fn scale_reads_desired_ready_and_version_from_the_deployment() {
    let (p, _) = platform(Box::new(|_| {
        (
            200,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "hello", "namespace": "default", "resourceVersion": "12"},
                   "spec": {"replicas": 3, "selector": {}, "template": {}},
                   "status": {"replicas": 3, "readyReplicas": 2}}),
        )
    }));
    let s = p.scale(&key()).await.unwrap();
    assert_eq!(
        (s.desired, s.ready, s.version.as_deref()),
        (3, 2, Some("12"))
    );
}

#[tokio::test]
async fn with_the_cache_scale_is_read_from_the_deployment_watch_not_a_get_per_call() {
    let deployment = |replicas: i32, version: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "hello", "namespace": "default", "resourceVersion": version},
               "spec": {"replicas": replicas, "selector": {}, "template": {}},
               "status": {"replicas": replicas, "readyReplicas": replicas}})
    };
    let (p, calls) = platform(Box::new(move |call| {
        if call.path == "/apis/apps/v1/deployments" && !call.query.contains("watch=true") {
            // The list behind the cache: 4 replicas at version 20.
            assert!(
                call.query.contains("zeroscale.dev%2Ffunction"),
                "{}",
                call.query
            );
            (
                200,
                json!({"apiVersion": "apps/v1", "kind": "DeploymentList",
                         "metadata": {"resourceVersion": "20"}, "items": [deployment(4, "20")]}),
            )
        } else if call.query.contains("watch=true") {
            (200, json!({}))
        } else {
            // A direct GET: 1 replica at version 7.
            (200, deployment(1, "7"))
        }
    }));
    let p = p.with_deployment_cache();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = p.scale(&key()).await.unwrap();
        if s.version.as_deref() == Some("20") {
            assert_eq!((s.desired, s.ready), (4, 4));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never filled"
        );
        tokio::task::yield_now().await;
    }
    let gets = |calls: &Arc<Mutex<Vec<Call>>>| {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == "/apis/apps/v1/namespaces/default/deployments/hello")
            .count()
    };
    let before = gets(&calls);
    for _ in 0..20 {
        assert_eq!(
            p.scale(&key()).await.unwrap().version.as_deref(),
            Some("20")
        );
    }
    assert_eq!(gets(&calls), before, "a filled cache makes no GET per call");
}

#[tokio::test]
async fn autoscaler_status_is_applied_with_its_own_field_manager() {
    // The API server answers with the whole Function.
    let (p, calls) = platform(Box::new(|c| {
        let mut f = c.body.clone();
        f["spec"] = json!({"template": {"spec": {"containers": [{"name": "app"}]}}});
        (200, f)
    }));
    let t = jiff::Timestamp::from_second(1_700_000_000).unwrap();
    p.publish_autoscaler_status(
        &key(),
        &AutoscalerStatus {
            desired_replicas: 2,
            last_request_time: Some(t),
        },
    )
    .await
    .unwrap();
    let calls = calls.lock().unwrap();
    let c = &calls[0];
    assert_eq!(c.method, "PATCH");
    assert_eq!(
        c.path,
        "/apis/zeroscale.dev/v1alpha1/namespaces/default/functions/hello/status"
    );
    assert!(c.query.contains("fieldManager=zeroscale-autoscaler"));
    assert_eq!(c.body["apiVersion"], "zeroscale.dev/v1alpha1");
    assert_eq!(c.body["kind"], "Function");
    assert_eq!(c.body["metadata"]["name"], "hello");
    let status = c.body["status"].as_object().unwrap();
    let mut fields: Vec<&str> = status.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        vec!["desiredReplicas", "lastRequestTime"],
        "nothing the operator owns"
    );
    assert_eq!(status["desiredReplicas"], 2);
    assert_eq!(status["lastRequestTime"], "2023-11-14T22:13:20Z");
}

/// A Function scaling StatefulSet `db`; `selector` on its status once it holds it.
fn db_function(selector: Option<&str>) -> Value {
    let mut f = json!({"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
        "metadata": {"name": "hello", "namespace": "default", "generation": 2,
                     "resourceVersion": "5", "uid": "u"},
        "spec": {"scaleTargetRef": {"kind": "StatefulSet", "name": "db"}, "port": 5432},
        "status": {"observedGeneration": 2}});
    if let Some(s) = selector {
        f["status"]["selector"] = json!(s);
    }
    f
}

/// Serves `function` to the platform's Function watch and drains the stream until the
/// platform has seen it.
async fn platform_seeing(
    function: Value,
    mut rest: Script,
) -> (KubePlatform, Arc<Mutex<Vec<Call>>>) {
    use futures::StreamExt;
    let (p, calls) = platform(Box::new(move |c| {
        if c.path == "/apis/zeroscale.dev/v1alpha1/functions" {
            if c.query.contains("watch=true") {
                return (200, json!({}));
            }
            return (
                200,
                json!({"apiVersion": "zeroscale.dev/v1alpha1", "kind": "FunctionList",
                       "metadata": {"resourceVersion": "9"}, "items": [function.clone()]}),
            );
        }
        rest(c)
    }));
    let mut functions = p.functions();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), functions.next())
        .await
        .expect("the Function list");
    assert!(matches!(
        first,
        Some(zeroscale::platform::FunctionEvent::Reset(_))
    ));
    tokio::spawn(async move { while functions.next().await.is_some() {} });
    (p, calls)
}

#[tokio::test]
async fn a_target_function_scales_its_target_only_once_it_holds_it() {
    const DB_SCALE: &str = "/apis/apps/v1/namespaces/default/statefulsets/db/scale";
    // Not held yet (no selector on the status): nothing is read or written.
    let (p, calls) = platform_seeing(db_function(None), Box::new(|_| (500, json!({})))).await;
    assert!(matches!(
        p.wake(&key(), 1).await,
        Err(PlatformError::NotFound(_))
    ));
    assert!(matches!(
        p.scale(&key()).await,
        Err(PlatformError::NotFound(_))
    ));
    assert!(p.stopping_replicas(&key()).await.unwrap().is_empty());
    assert!(
        calls
            .lock()
            .unwrap()
            .iter()
            .all(|c| c.path.contains("/functions")),
        "only the Function watch"
    );

    // Held: the StatefulSet's scale subresource, never a Deployment named like the
    // Function; drains find its pods by the target's selector.
    let (p, calls) = platform_seeing(
        db_function(Some("app=db")),
        Box::new(|c| match (c.method.as_str(), c.path.as_str()) {
            ("GET", DB_SCALE) => (200, scale(0, "7")),
            ("PUT", DB_SCALE) => (200, c.body.clone()),
            ("GET", "/apis/apps/v1/namespaces/default/statefulsets/db") => (
                200,
                json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                       "metadata": {"name": "db", "namespace": "default", "resourceVersion": "8"},
                       "spec": {"replicas": 2, "selector": {}, "serviceName": "db", "template": {}},
                       "status": {"replicas": 2, "readyReplicas": 1}}),
            ),
            ("GET", "/api/v1/namespaces/default/pods") => (
                200,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    {"metadata": {"name": "db-0", "deletionTimestamp": "2024-01-01T00:00:00Z"},
                     "status": {"podIP": "10.0.0.5"}}]}),
            ),
            other => panic!("unexpected {other:?}"),
        }),
    )
    .await;
    assert_eq!(p.wake(&key(), 1).await.unwrap(), WakeOutcome::Woken);
    let s = p.scale(&key()).await.unwrap();
    assert_eq!(
        (s.desired, s.ready, s.version.as_deref()),
        (2, 1, Some("8"))
    );
    assert_eq!(
        p.stopping_replicas(&key()).await.unwrap(),
        vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    let calls = calls.lock().unwrap();
    let put = calls.iter().find(|c| c.method == "PUT").unwrap();
    assert_eq!(put.path, DB_SCALE);
    assert_eq!(put.body["metadata"]["name"], "db");
    assert_eq!(put.body["metadata"]["resourceVersion"], "7");
    let pods = calls.iter().find(|c| c.path.ends_with("/pods")).unwrap();
    assert!(
        pods.query.contains("labelSelector=app%3Ddb"),
        "{}",
        pods.query
    );
    assert!(!calls.iter().any(|c| c.path.contains("/deployments/")));
}

#[tokio::test]
async fn with_the_cache_a_targets_scale_is_read_again_only_when_it_changed() {
    let (p, calls) = platform_seeing(
        db_function(Some("app=db")),
        Box::new(|c| {
            if c.path == "/apis/apps/v1/statefulsets" {
                if c.query.contains("watch=true") {
                    return (200, json!({}));
                }
                // The metadata-only list: the object and its version, nothing else.
                return (
                    200,
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                           "metadata": {"resourceVersion": "9"},
                           "items": [{"apiVersion": "meta.k8s.io/v1",
                                      "kind": "PartialObjectMetadata",
                                      "metadata": {"name": "db", "namespace": "default",
                                                   "resourceVersion": "8"}}]}),
                );
            }
            assert_eq!(c.path, "/apis/apps/v1/namespaces/default/statefulsets/db");
            (
                200,
                json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
                       "metadata": {"name": "db", "namespace": "default", "resourceVersion": "8"},
                       "spec": {"replicas": 0, "selector": {}, "serviceName": "db", "template": {}},
                       "status": {"replicas": 0}}),
            )
        }),
    )
    .await;
    let p = p.with_deployment_cache();
    let gets = |calls: &Arc<Mutex<Vec<Call>>>| {
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path.ends_with("/statefulsets/db"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        assert_eq!(p.scale(&key()).await.unwrap().desired, 0);
        let listed = calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.path == "/apis/apps/v1/statefulsets");
        if listed && gets(&calls) > 0 {
            // One more read to cache under the listed version.
            p.scale(&key()).await.unwrap();
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never listed");
        tokio::task::yield_now().await;
    }
    let before = gets(&calls);
    for _ in 0..20 {
        assert_eq!(p.scale(&key()).await.unwrap().version.as_deref(), Some("8"));
    }
    assert_eq!(gets(&calls), before, "an unchanged target costs no GET");
}
