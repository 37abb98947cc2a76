//! The scheduler of a one-node cluster: every pending pod without a node (all
//! namespaces) is bound to the stand-in node through the `pods/binding` subresource, as
//! kube-scheduler does, and gets the `Scheduled` Event. No filtering: there is nowhere
//! else to put it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::EventType;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::Ctx;

/// Whether the scheduler should bind `pod`.
pub fn wants_binding(pod: &Pod) -> bool {
    let unbound = pod
        .spec
        .as_ref()
        .is_some_and(|s| s.node_name.as_deref().unwrap_or("").is_empty());
    let live = pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
    unbound && live
}

/// Binds pods until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields("spec.nodeName=");
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let binding: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) if wants_binding(&pod) => {
                let Some(uid) = pod.uid() else { continue };
                let fresh = binding
                    .lock()
                    .map(|mut set| set.insert(uid.clone()))
                    .unwrap_or(false);
                if fresh {
                    let (ctx, binding) = (ctx.clone(), binding.clone());
                    tokio::spawn(async move {
                        bind(&ctx, &pod).await;
                        if let Ok(mut set) = binding.lock() {
                            set.remove(&uid);
                        }
                    });
                }
            }
            Some(Err(e)) => warn!(error = %e, "unscheduled pod watch"),
            None => return,
            _ => {}
        }
    }
}

/// Binds one pod, retrying server errors; a conflict (already bound) or a missing pod
/// ends it quietly.
async fn bind(ctx: &Ctx, pod: &Pod) {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace, "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": ctx.node_name},
    });
    let mut delay = Duration::from_millis(200);
    for _ in 0..8 {
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                debug!(pod = %name, %namespace, "bound");
                ctx.scheduler_event(
                    pod,
                    EventType::Normal,
                    "Scheduled",
                    format!(
                        "Successfully assigned {namespace}/{name} to {}",
                        ctx.node_name
                    ),
                );
                return;
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => return,
            Err(e) => {
                warn!(pod = %name, %namespace, error = %e, "binding failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_live_unbound_pods_are_bound() {
        assert!(wants_binding(&pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": []}})
        )));
        assert!(!wants_binding(&pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [], "nodeName": "n"}})
        )));
        assert!(!wants_binding(&pod(json!({"metadata": {"name": "a",
            "deletionTimestamp": "2024-01-01T00:00:00Z"}, "spec": {"containers": []}}))));
        assert!(!wants_binding(&pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": []},
            "status": {"phase": "Failed"}})
        )));
    }
}
