//! The watches behind the platform and the operator, against a scripted API server that
//! answers a LIST and one WATCH: a list becomes one `Reset` (the truth), watch events
//! become `Applied`/`Deleted`/`Updated`, and the label selectors are the ones the
//! operator's objects carry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeroscale::api::FunctionKey;
use zeroscale::operator::activators;
use zeroscale::platform::kube::KubePlatform;
use zeroscale::platform::{EndpointsEvent, FunctionEvent, Platform};

/// Answers each LIST with `list` and the first WATCH with `events` (one JSON per line);
/// later WATCHes are held open. Records every request's path and query.
fn client(list: Value, events: Vec<Value>) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let record = seen.clone();
    tokio::spawn(async move {
        let mut watched = false;
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            record.lock().unwrap().push(uri.clone());
            let body = if uri.contains("watch=true") {
                if watched {
                    held.push(send);
                    continue;
                }
                watched = true;
                events
                    .iter()
                    .map(|e| format!("{e}\n"))
                    .collect::<String>()
                    .into_bytes()
            } else if request.uri().path().ends_with("/services") {
                // The activator Service (its drain hook address): none here.
                serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ServiceList",
                                           "metadata": {"resourceVersion": "1"}, "items": []}))
                .unwrap()
            } else {
                serde_json::to_vec(&list).unwrap()
            };
            send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(service, "default"), seen)
}

fn function(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
           "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}}})
}

fn slice(name: &str, function: &str, ips: &[&str], rv: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                        "labels": {"zeroscale.dev/function": function,
                                   "zeroscale.dev/service": "private",
                                   "kubernetes.io/service-name": format!("{function}-private")}},
           "addressType": "IPv4",
           "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

async fn next<T>(s: &mut (impl futures::Stream<Item = T> + Unpin)) -> T {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("an event in time")
        .expect("the stream does not end")
}

#[tokio::test]
async fn functions_list_is_one_reset_then_changes_follow() {
    let list = json!({"apiVersion": "zeroscale.dev/v1alpha1", "kind": "FunctionList",
                      "metadata": {"resourceVersion": "10"},
                      "items": [function("a", "5"), function("b", "6")]});
    let events = vec![
        json!({"type": "ADDED", "object": function("c", "11")}),
        json!({"type": "DELETED", "object": function("a", "12")}),
    ];
    let (client, _) = client(list, events);
    let platform = KubePlatform::new(client, None);
    let mut s = platform.functions();
    match next(&mut s).await {
        FunctionEvent::Reset(all) => {
            let mut names: Vec<String> = all.iter().map(|f| f.key().name).collect();
            names.sort();
            assert_eq!(names, vec!["a", "b"]);
        }
        other => panic!("expected a reset first, got {other:?}"),
    }
    match next(&mut s).await {
        FunctionEvent::Applied(f) => assert_eq!(f.key().name, "c"),
        other => panic!("expected c applied, got {other:?}"),
    }
    match next(&mut s).await {
        FunctionEvent::Deleted(k) => assert_eq!(k, FunctionKey::new("default", "a")),
        other => panic!("expected a deleted, got {other:?}"),
    }
}

#[tokio::test]
async fn endpoints_follow_the_private_service_slices() {
    let list = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                      "metadata": {"resourceVersion": "10"},
                      "items": [slice("hello-private-x", "hello", &["10.0.0.1"], "5")]});
    let events = vec![json!({"type": "ADDED",
                             "object": slice("hello-private-y", "hello", &["10.0.0.2"], "11")})];
    let (client, seen) = client(list, events);
    let platform = KubePlatform::new(client, Some("default".into()));
    let mut s = platform.endpoints();
    match next(&mut s).await {
        EndpointsEvent::Reset(all) => {
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].0, FunctionKey::new("default", "hello"));
            assert_eq!(all[0].1[0].addr.to_string(), "10.0.0.1:8080");
        }
        other => panic!("expected a reset first, got {other:?}"),
    }
    match next(&mut s).await {
        EndpointsEvent::Updated(k, e) => {
            assert_eq!(k.name, "hello");
            let addrs: Vec<String> = e.iter().map(|e| e.addr.to_string()).collect();
            assert_eq!(addrs, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
        }
        other => panic!("expected an update, got {other:?}"),
    }
    let first = seen.lock().unwrap()[0].clone();
    assert!(
        first.starts_with("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?")
            && first.contains("labelSelector=zeroscale.dev%2Fservice%3Dprivate"),
        "{first}"
    );
}

#[tokio::test]
async fn activator_endpoints_are_published_after_the_first_list() {
    let mut a = slice("zeroscale-activator-x", "x", &["10.1.0.7", "10.1.0.8"], "5");
    a["metadata"]["namespace"] = json!("zeroscale-system");
    let list = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                      "metadata": {"resourceVersion": "10"}, "items": [a]});
    let (client, seen) = client(list, vec![]);
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(activators::follow(
        client,
        "zeroscale-system".into(),
        "zeroscale-activator".into(),
        tx,
        stop.clone(),
    ));
    let got = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("published in time")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(got.port, 8080);
    assert_eq!(got.endpoints.len(), 2);
    stop.cancel();
    task.await.unwrap();
    let first = seen.lock().unwrap()[0].clone();
    assert!(
        first.contains("/namespaces/zeroscale-system/endpointslices")
            && first.contains("labelSelector=kubernetes.io%2Fservice-name%3Dzeroscale-activator"),
        "{first}"
    );
}
