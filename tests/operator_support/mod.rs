//! A small fake API server for the operator's tests, behind kube's client (tower-test
//! mock): it stores what is applied (with a resourceVersion), answers GETs and
//! LISTs, holds WATCHes open, accepts Events, serves the scale subresource (GET, and PUT
//! with a resourceVersion precondition), applies the JSON patches of finalizers, and
//! fails the requests a test scripts.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// One request the reconciler made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl Call {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// A small API server: stores what is applied (with a resourceVersion), answers
/// GETs, accepts Events, and fails the requests a test scripts.
#[derive(Default)]
pub struct FakeApi {
    pub objects: Mutex<HashMap<String, Value>>,
    pub calls: Mutex<Vec<Call>>,
    /// Notified after every answered request.
    pub answered: tokio::sync::Notify,
    /// (method, path) -> (status code, message), answered once.
    pub failures: Mutex<HashMap<(String, String), (u16, String)>>,
    version: Mutex<u64>,
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn status_body(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        _ => "Unknown",
    };
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

const COLLECTIONS: &[&str] = &[
    "deployments",
    "statefulsets",
    "services",
    "endpointslices",
    "pods",
    "functions",
    "leases",
];

fn is_collection(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|last| COLLECTIONS.contains(&last))
}

/// The label selector of a query (`k=v` and `k` terms only).
fn selector(query: &str) -> Vec<(String, Option<String>)> {
    let Some(raw) = param(query, "labelSelector") else {
        return Vec::new();
    };
    let decoded = raw
        .replace("%2F", "/")
        .replace("%3D", "=")
        .replace("%2C", ",");
    decoded
        .split(',')
        .map(|term| match term.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (term.to_string(), None),
        })
        .collect()
}

/// A query parameter's raw value.
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// A LIST of the objects directly under a collection path (all namespaces when the
/// path has none), filtered by the label selector, in pages when the client sets a
/// `limit` (the `continue` token is the index of the next object, by path).
fn list(objects: &HashMap<String, Value>, call: &Call) -> Value {
    let plural = call.path.rsplit('/').next().unwrap_or_default();
    let namespaced = call.path.contains("/namespaces/");
    let terms = selector(&call.query);
    let mut items: Vec<(&String, &Value)> = objects
        .iter()
        .filter(|(path, _)| {
            if namespaced {
                path.strip_prefix(&format!("{}/", call.path))
                    .is_some_and(|rest| !rest.contains('/'))
            } else {
                let prefix = call.path.trim_end_matches(plural);
                path.starts_with(prefix) && path.rsplit('/').nth(1) == Some(plural)
            }
        })
        .filter(|(_, o)| {
            terms.iter().all(|(k, v)| {
                let have = o["metadata"]["labels"][k].as_str();
                match v {
                    Some(v) => have == Some(v.as_str()),
                    None => have.is_some(),
                }
            })
        })
        .collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    let start = param(&call.query, "continue")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0)
        .min(items.len());
    let end = param(&call.query, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .map_or(items.len(), |l| (start + l).min(items.len()));
    let page: Vec<Value> = items[start..end]
        .iter()
        .map(|(_, o)| (*o).clone())
        .collect();
    let mut metadata = json!({"resourceVersion": "1"});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    json!({"apiVersion": "v1", "kind": "List", "metadata": metadata, "items": page})
}

impl FakeApi {
    fn handle(&self, call: &Call) -> (u16, Value) {
        let key = (call.method.clone(), call.path.clone());
        if let Some((code, message)) = self.failures.lock().unwrap().remove(&key) {
            return (code, status_body(code, &message));
        }
        let mut objects = self.objects.lock().unwrap();
        if let Some(parent) = call.path.strip_suffix("/scale") {
            return self.scale(&mut objects, parent, call);
        }
        match call.method.as_str() {
            "GET" if is_collection(&call.path) => (200, list(&objects, call)),
            "GET" => match objects.get(&call.path) {
                Some(o) => (200, o.clone()),
                None => (404, status_body(404, "not found")),
            },
            "POST" => {
                // Events.
                let mut body = call.body.clone();
                if body["metadata"]["name"].is_null() {
                    body["metadata"]["name"] = json!("event-1");
                }
                (201, body)
            }
            "PATCH" if call.path.ends_with("/status") => {
                let parent = call.path.trim_end_matches("/status").to_string();
                let Some(object) = objects.get_mut(&parent) else {
                    return (404, status_body(404, "not found"));
                };
                merge(object, &json!({"status": call.body["status"]}));
                (200, object.clone())
            }
            "PATCH" if call.body.is_array() => {
                let Some(object) = objects.get_mut(&call.path) else {
                    return (404, status_body(404, "not found"));
                };
                match json_patch(object, &call.body) {
                    Ok(()) => (200, object.clone()),
                    Err(message) => (422, status_body(422, &message)),
                }
            }
            "PATCH" => {
                let mut version = self.version.lock().unwrap();
                let existing = objects.get(&call.path).cloned();
                if let Some(want) = call.body["metadata"]["resourceVersion"].as_str() {
                    let have = existing
                        .as_ref()
                        .and_then(|e| e["metadata"]["resourceVersion"].as_str().map(String::from));
                    if have.as_deref() != Some(want) {
                        return (409, status_body(409, "the object has been modified"));
                    }
                }
                // Server-side apply by the only applier of these objects: what it no longer
                // sends goes, but the status and a `spec.replicas` that another manager
                // (the autoscaler) owns stay.
                let mut object = call.body.clone();
                if let Some(existing) = &existing {
                    if !existing["status"].is_null() {
                        object["status"] = existing["status"].clone();
                    }
                    if object["spec"].is_object()
                        && object["spec"].get("replicas").is_none()
                        && !existing["spec"]["replicas"].is_null()
                    {
                        object["spec"]["replicas"] = existing["spec"]["replicas"].clone();
                    }
                }
                *version += 1;
                object["metadata"]["resourceVersion"] = json!(version.to_string());
                object["metadata"]["uid"] = json!(format!("uid-{}", call.path.len()));
                objects.insert(call.path.clone(), object.clone());
                (200, object)
            }
            _ => (405, status_body(405, "method not allowed")),
        }
    }

    /// The scale subresource of a Deployment or StatefulSet at `parent`.
    fn scale(
        &self,
        objects: &mut HashMap<String, Value>,
        parent: &str,
        call: &Call,
    ) -> (u16, Value) {
        let Some(object) = objects.get_mut(parent) else {
            return (404, status_body(404, "not found"));
        };
        if call.method == "PUT" {
            let have = object["metadata"]["resourceVersion"]
                .as_str()
                .map(String::from);
            let want = call.body["metadata"]["resourceVersion"]
                .as_str()
                .map(String::from);
            if want.is_some() && want != have {
                return (409, status_body(409, "the object has been modified"));
            }
            let mut version = self.version.lock().unwrap();
            *version += 1;
            object["spec"]["replicas"] = call.body["spec"]["replicas"].clone();
            object["metadata"]["resourceVersion"] = json!(version.to_string());
        } else if call.method != "GET" {
            return (405, status_body(405, "method not allowed"));
        }
        let meta = &object["metadata"];
        (
            200,
            json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                   "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                                "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                   "spec": {"replicas": object["spec"]["replicas"]},
                   "status": {"replicas": object["status"]["replicas"].as_i64().unwrap_or(0)}}),
        )
    }

    /// Waits (bounded) until `check` holds after some request.
    pub async fn until(&self, what: &str, check: impl Fn(&FakeApi) -> bool) {
        let wait = async {
            loop {
                let answered = self.answered.notified();
                if check(self) {
                    return;
                }
                answered.await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    pub fn object<K: serde::de::DeserializeOwned>(&self, path: &str) -> Option<K> {
        let o = self.objects.lock().unwrap().get(path).cloned()?;
        Some(serde_json::from_value(o).expect("a valid object"))
    }
}

/// Applies a JSON patch (`test`, `add`, `remove`; what finalizer patches use).
fn json_patch(object: &mut Value, ops: &Value) -> Result<(), String> {
    let mut patched = object.clone();
    for op in ops.as_array().into_iter().flatten() {
        let path = op["path"].as_str().unwrap_or_default();
        let (parent_path, last) = path.rsplit_once('/').unwrap_or(("", path));
        match op["op"].as_str() {
            Some("test") => {
                let have = patched.pointer(path).cloned().unwrap_or(Value::Null);
                if have != op["value"] {
                    return Err(format!("test of {path} failed: {have} != {}", op["value"]));
                }
            }
            Some("add") => {
                let parent = patched
                    .pointer_mut(parent_path)
                    .ok_or_else(|| format!("no {parent_path}"))?;
                match parent {
                    Value::Array(items) if last == "-" => items.push(op["value"].clone()),
                    Value::Object(map) => {
                        map.insert(last.to_string(), op["value"].clone());
                    }
                    _ => return Err(format!("cannot add at {path}")),
                }
            }
            Some("remove") => {
                let parent = patched
                    .pointer_mut(parent_path)
                    .ok_or_else(|| format!("no {parent_path}"))?;
                match parent {
                    Value::Array(items) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
                        if i >= items.len() {
                            return Err(format!("no {path}"));
                        }
                        items.remove(i);
                    }
                    Value::Object(map) => {
                        map.remove(last).ok_or_else(|| format!("no {path}"))?;
                    }
                    _ => return Err(format!("cannot remove {path}")),
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    *object = patched;
    Ok(())
}

/// A client whose requests the fake API answers.
pub fn client(api: Arc<FakeApi>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        // Watches stay open and quiet: the tests drive changes through LISTs and GETs.
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            if request
                .uri()
                .query()
                .is_some_and(|q| q.contains("watch=true"))
            {
                held.push(send);
                continue;
            }
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let call = Call {
                method,
                path,
                query,
                body,
            };
            let (code, reply) = api.handle(&call);
            api.calls.lock().unwrap().push(call);
            api.answered.notify_waiters();
            let response = Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    });
    kube::Client::new(service, "default")
}
