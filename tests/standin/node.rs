//! The Node object and its liveness: registration (labels, addresses, capacity, a Ready
//! condition), the Lease in `kube-node-lease` renewed every 10 s with the Ready
//! heartbeat, so the node-lifecycle controller never taints the node; removal of the
//! not-ready/unreachable taints a previous run's absence left; deletion of the pods a
//! previous run left bound here; and NotReady (or deletion) on the way out.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;

pub const CPU_CORES: u64 = 64;
pub const MEMORY_BYTES: u64 = 256 * 1024 * 1024 * 1024;
const MAX_PODS: u64 = 1000;
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the Lease and the Ready heartbeat are renewed (the kubelet's default).
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Taints the node-lifecycle controller puts on a node that stopped reporting.
const STALE_TAINTS: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// The Node as created: name and labels (the status is written separately).
pub fn node_object(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels(name),
        },
        "spec": {},
    })
}

fn node_labels(name: &str) -> Value {
    json!({
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "node.kubernetes.io/instance-type": "zeroscale-standin",
        "node.kubernetes.io/exclude-from-external-load-balancers": "true",
    })
}

/// What the node reports about itself.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    pub ip: String,
    pub kubelet_version: String,
    pub kernel: String,
}

/// The node status patch: Ready (or not) since `since`, heartbeat `now`.
pub fn node_status(facts: &NodeFacts, ready: bool, since: Timestamp, now: Timestamp) -> Value {
    let t = |ts: Timestamp| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let pressure = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "False", "reason": reason, "message": message,
               "lastHeartbeatTime": t(now), "lastTransitionTime": t(since)})
    };
    let resources = json!({
        "cpu": CPU_CORES.to_string(),
        "memory": format!("{}Ki", MEMORY_BYTES / 1024),
        "pods": MAX_PODS.to_string(),
        "ephemeral-storage": "100Gi",
    });
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": facts.ip},
                {"type": "Hostname", "address": facts.name},
            ],
            "conditions": [
                pressure("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                pressure("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                pressure("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                if ready {
                    json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "zeroscale stand-in node is posting ready status",
                           "lastHeartbeatTime": t(now), "lastTransitionTime": t(since)})
                } else {
                    json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                           "message": "zeroscale stand-in node stopped",
                           "lastHeartbeatTime": t(now), "lastTransitionTime": t(now)})
                },
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "zeroscale-standin",
                "systemUUID": "zeroscale-standin",
                "bootID": "zeroscale-standin",
                "kernelVersion": facts.kernel,
                "osImage": "zeroscale stand-in node",
                "containerRuntimeVersion": "standin://0.1.0",
                "kubeletVersion": facts.kubelet_version,
                "kubeProxyVersion": facts.kubelet_version,
                "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }
    })
}

/// The node's taints without the stale ones, or `None` when there were none of those.
pub fn without_stale_taints(node: &Node) -> Option<Value> {
    let taints = node.spec.as_ref()?.taints.clone()?;
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| !STALE_TAINTS.contains(&t.key.as_str()))
        .collect();
    (kept.len() != taints.len()).then(|| json!(kept))
}

fn facts(ctx: &Ctx) -> NodeFacts {
    NodeFacts {
        name: ctx.node_name.clone(),
        ip: ctx.node_ip.to_string(),
        kubelet_version: ctx.git_version.clone(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Creates (or takes over) the Node, reports it Ready, clears stale taints and creates
/// its Lease. Returns when the node became Ready.
pub async fn register(ctx: &Ctx) -> Result<Timestamp, kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    match api.get_opt(&ctx.node_name).await? {
        None => {
            let node: Node = serde_json::from_value(node_object(&ctx.node_name))
                .map_err(kube::Error::SerdeError)?;
            api.create(&PostParams::default(), &node).await?;
            info!(node = %ctx.node_name, "node created");
        }
        Some(_) => {
            // A node a stopping run cordoned is taken back into service.
            let labels = json!({
                "metadata": {"labels": node_labels(&ctx.node_name)},
                "spec": {"unschedulable": null},
            });
            api.patch(
                &ctx.node_name,
                &PatchParams::default(),
                &Patch::Merge(&labels),
            )
            .await?;
            info!(node = %ctx.node_name, "node taken over");
        }
    }
    let since = Timestamp::now();
    let status = node_status(&facts(ctx), true, since, since);
    api.patch_status(
        &ctx.node_name,
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    // The node-lifecycle controller edits the taints too: retry on conflicts. It lifts
    // them itself once it sees the node Ready, so giving up is harmless.
    let mut node = api.get(&ctx.node_name).await?;
    for _ in 0..5 {
        let Some(taints) = without_stale_taints(&node) else {
            break;
        };
        let patch = json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": taints}});
        match api
            .patch(
                &ctx.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(patched) => node = patched,
            Err(kube::Error::Api(e)) if e.code == 409 => node = api.get(&ctx.node_name).await?,
            Err(e) => {
                warn!(error = %e, "removing stale taints");
                break;
            }
        }
    }
    renew_lease(ctx, &node).await?;
    Ok(since)
}

async fn renew_lease(ctx: &Ctx, node: &Node) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let now = Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string();
    let spec = json!({"holderIdentity": ctx.node_name, "leaseDurationSeconds": LEASE_DURATION_SECONDS, "renewTime": now});
    match api
        .patch(
            &ctx.node_name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {
                    "name": ctx.node_name,
                    "namespace": LEASE_NAMESPACE,
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                         "name": ctx.node_name, "uid": node.uid().unwrap_or_default()}],
                },
                "spec": spec,
            }))
            .map_err(kube::Error::SerdeError)?;
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Renews the Lease and the Ready heartbeat until `shutdown`.
pub async fn keep_alive(ctx: Arc<Ctx>, since: Timestamp, shutdown: CancellationToken) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = node_status(&facts(&ctx), true, since, Timestamp::now());
        match api
            .patch_status(
                &ctx.node_name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            Ok(node) => {
                if let Err(e) = renew_lease(&ctx, &node).await {
                    warn!(error = %e, "renewing the node lease");
                }
            }
            Err(e) => warn!(error = %e, "node heartbeat"),
        }
    }
}

/// Cordons the node as the stand-in begins to stop: its Lease is still renewed while
/// its pods get their grace periods, and `spec.unschedulable` is how anyone looking at
/// the node (the e2e tests deciding whether a live stand-in is one to share) tells a
/// node on its way out from one in service.
pub async fn cordon(ctx: &Ctx) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"unschedulable": true}});
    if let Err(e) = api
        .patch(
            &ctx.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        warn!(error = %e, "cordoning the node");
    }
}

/// Marks the node NotReady, or deletes it.
pub async fn stop(ctx: &Ctx, delete: bool) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let result = if delete {
        api.delete(&ctx.node_name, &DeleteParams::default())
            .await
            .map(drop)
    } else {
        let now = Timestamp::now();
        let status = node_status(&facts(ctx), false, now, now);
        api.patch_status(
            &ctx.node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .map(drop)
    };
    if let Err(e) = result {
        warn!(error = %e, "leaving the cluster");
    }
}

/// Deletes (grace 0) the pods a previous run left running on this node: their processes
/// died with it. Finished pods keep their final status.
pub async fn delete_leftover_pods(ctx: &Ctx) -> Result<usize, kube::Error> {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let pods = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={}", ctx.node_name)))
        .await?;
    let mut deleted = 0;
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let ns_api: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match ns_api.delete(&pod.name_any(), &params).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            name: "zeroscale-standin".into(),
            ip: "10.244.0.1".into(),
            kubelet_version: "v1.36.0".into(),
            kernel: "6.1".into(),
        }
    }

    #[test]
    fn the_node_reports_ready_with_its_address_and_capacity() {
        let since = Timestamp::UNIX_EPOCH;
        let now = since + jiff::SignedDuration::from_secs(30);
        let v = node_status(&facts(), true, since, now);
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "n"}, "status": v["status"]}))
                .unwrap();
        let status = node.status.unwrap();
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_heartbeat_time.unwrap().0, now);
        assert_eq!(ready.last_transition_time.unwrap().0, since);
        let addresses = status.addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(addresses[0].address, "10.244.0.1");
        assert_eq!(status.allocatable.unwrap()["pods"].0, "1000");
        assert_eq!(status.node_info.unwrap().kubelet_version, "v1.36.0");

        let v = node_status(&facts(), false, since, now);
        assert_eq!(v["status"]["conditions"][3]["status"], "False");
    }

    #[test]
    fn labels_name_the_host_and_os() {
        let v = node_object("n1");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/os"], "linux");
    }

    #[test]
    fn only_stale_taints_are_removed() {
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {"taints": [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
                {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
            ]}}))
            .unwrap();
        let kept = without_stale_taints(&node).unwrap();
        assert_eq!(kept.as_array().unwrap().len(), 1);
        assert_eq!(kept[0]["key"], "dedicated");
        let clean: Node =
            serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {}})).unwrap();
        assert!(without_stale_taints(&clean).is_none());
    }
}
