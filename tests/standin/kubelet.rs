//! The node's pod watch (`spec.nodeName=<node>`): one [`pod::run`] worker per pod uid,
//! fed the latest object. A re-list is the truth: a worker whose pod is missing from it
//! learns that its pod is gone. On shutdown every worker stops its pod and the watch ends
//! when all have.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::Ctx;
use crate::pod::{self, PodEvent};

/// Follows the node's pods until `shutdown`, then stops them all.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut workers: HashMap<String, watch::Sender<PodEvent>> = HashMap::new();
    // Pods whose worker ended; their late events must not start a new one.
    let mut finished: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut relisted: Option<HashSet<String>> = None;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next() => {
                if let Ok(uid) = done {
                    workers.remove(&uid);
                    finished.insert(uid);
                }
            }
            event = stream.next() => match event {
                Some(Ok(Event::Apply(p))) => dispatch(&ctx, p, &mut workers, &finished, &mut tasks),
                Some(Ok(Event::InitApply(p))) => {
                    if let (Some(seen), Some(uid)) = (relisted.as_mut(), p.uid()) {
                        seen.insert(uid);
                    }
                    dispatch(&ctx, p, &mut workers, &finished, &mut tasks);
                }
                Some(Ok(Event::Delete(p))) => {
                    if let Some(uid) = p.uid() {
                        if let Some(tx) = workers.get(&uid) {
                            tx.send_replace(PodEvent::Gone);
                        }
                        finished.remove(&uid);
                    }
                }
                Some(Ok(Event::Init)) => relisted = Some(HashSet::new()),
                Some(Ok(Event::InitDone)) => {
                    if let Some(seen) = relisted.take() {
                        for (uid, tx) in &workers {
                            if !seen.contains(uid) {
                                tx.send_replace(PodEvent::Gone);
                            }
                        }
                        finished.retain(|uid| seen.contains(uid));
                    }
                }
                Some(Err(e)) => warn!(error = %e, "pod watch"),
                None => break,
            }
        }
    }
    for tx in workers.values() {
        tx.send_replace(PodEvent::Shutdown);
    }
    while tasks.join_next().await.is_some() {}
}

fn dispatch(
    ctx: &Arc<Ctx>,
    pod: Pod,
    workers: &mut HashMap<String, watch::Sender<PodEvent>>,
    finished: &HashSet<String>,
    tasks: &mut JoinSet<String>,
) {
    let Some(uid) = pod.uid() else {
        return;
    };
    let pod = Arc::new(pod);
    if let Some(tx) = workers.get(&uid) {
        tx.send_replace(PodEvent::Update(pod));
        return;
    }
    if finished.contains(&uid) {
        return;
    }
    debug!(pod = %pod.name_any(), %uid, "new pod on this node");
    let (tx, rx) = watch::channel(PodEvent::Update(pod.clone()));
    workers.insert(uid.clone(), tx);
    let ctx = ctx.clone();
    tasks.spawn(async move {
        pod::run(ctx, pod, rx).await;
        uid
    });
}
