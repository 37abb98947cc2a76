//! One Function's replicas on this machine: starts and stops replica processes to match
//! the desired count, replaces them rolling-update style when the template changes (a
//! new replica is ready before an old one is drained, like a Deployment with
//! maxUnavailable 0), and reports ready endpoints and start-up failures to the platform.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::replica::{self, ReplicaCtx, ReplicaEvent, Stop};
use super::template::{ReplicaTemplate, TemplateError};
use super::{Inner, ProcessView, ReplicaSetView};
use crate::api::FunctionKey;
use crate::platform::Endpoint;

/// What the platform asks of a Function's replicas.
#[derive(Debug, Clone)]
pub struct Target {
    pub replicas: u32,
    /// Bumped when the template changes: replicas of older revisions are replaced.
    pub revision: u64,
    pub template: Result<Arc<ReplicaTemplate>, TemplateError>,
}

/// A start-up failure of a replica.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
    pub failures: u32,
}

impl Failure {
    /// Whether it means the Function cannot start (rather than one unlucky exit).
    fn is_persistent(&self) -> bool {
        self.reason != "CrashLoop" || self.failures >= 2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready(std::net::SocketAddr),
    Stopping,
}

struct Replica {
    revision: u64,
    name: String,
    state: State,
    stop: watch::Sender<Stop>,
    pid: Option<u32>,
    port: Option<u16>,
    failure: Option<Failure>,
}

/// Runs until `gone` (the Function was deleted or dev is stopping), then stops every
/// replica (SIGKILL at once when `kill` fires) and returns when they are all gone.
#[tracing::instrument(name = "function", skip_all, fields(function = %key))]
pub async fn supervise(
    key: FunctionKey,
    inner: Arc<Inner>,
    mut target: watch::Receiver<Target>,
    gone: CancellationToken,
    kill: CancellationToken,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        key,
        inner,
        events_tx,
        replicas: BTreeMap::new(),
        tasks: JoinSet::new(),
        task_ids: HashMap::new(),
        next_id: 0,
    };
    loop {
        let wanted = target.borrow_and_update().clone();
        sup.reconcile(&wanted);
        tokio::select! {
            () = gone.cancelled() => break,
            changed = target.changed() => if changed.is_err() { break },
            Some((id, event)) = events.recv() => sup.on_event(id, event),
            Some(done) = sup.tasks.join_next_with_id(), if !sup.tasks.is_empty() => sup.on_exit(done),
        }
    }
    // Stop everything: out of the endpoints first, then drain and terminate.
    let mode = if kill.is_cancelled() {
        Stop::Kill
    } else {
        Stop::Drain
    };
    let ids: Vec<u64> = sup.replicas.keys().copied().collect();
    for id in &ids {
        if let Some(r) = sup.replicas.get_mut(id) {
            r.state = State::Stopping;
        }
    }
    sup.publish();
    for r in sup.replicas.values() {
        let _ = r.stop.send(mode);
    }
    while !sup.tasks.is_empty() {
        tokio::select! {
            () = kill.cancelled(), if mode != Stop::Kill => {
                for r in sup.replicas.values() {
                    let _ = r.stop.send(Stop::Kill);
                }
            }
            Some(done) = sup.tasks.join_next_with_id() => sup.on_exit(done),
            Some((id, event)) = events.recv() => sup.on_event(id, event),
        }
    }
    sup.publish();
}

struct Supervisor {
    key: FunctionKey,
    inner: Arc<Inner>,
    events_tx: mpsc::UnboundedSender<(u64, ReplicaEvent)>,
    replicas: BTreeMap<u64, Replica>,
    tasks: JoinSet<u64>,
    task_ids: HashMap<tokio::task::Id, u64>,
    next_id: u64,
}

impl Supervisor {
    /// Starts and stops replicas to match `target`, then publishes the result.
    fn reconcile(&mut self, target: &Target) {
        let template = target.template.as_ref().ok();
        let want = if template.is_some() {
            target.replicas as usize
        } else {
            0
        };
        let active = |r: &&Replica| r.state != State::Stopping;
        let is_new = |r: &Replica| r.revision == target.revision;
        let mut to_stop: Vec<u64> = Vec::new();

        // Start replicas of the current revision, surging over `want` by a quarter
        // (at least one) while old ones are being replaced.
        let surge = want.div_ceil(4).max(1);
        if let Some(template) = template {
            loop {
                let active_count = self.replicas.values().filter(active).count();
                let new_count = self
                    .replicas
                    .values()
                    .filter(active)
                    .filter(|r| is_new(r))
                    .count();
                if new_count >= want || active_count >= want + surge {
                    break;
                }
                self.start(target.revision, template.clone());
            }
        }

        // Too many of the current revision: stop the unready, then the newest.
        let mut new: Vec<(&u64, &Replica)> = self
            .replicas
            .iter()
            .filter(|(_, r)| active(r) && is_new(r))
            .collect();
        new.sort_by_key(|(id, r)| (matches!(r.state, State::Ready(_)), std::cmp::Reverse(**id)));
        let extra = new.len().saturating_sub(want);
        to_stop.extend(new.iter().take(extra).map(|(id, _)| **id));

        // Old revisions: unready ones go at once; ready ones while enough others are ready.
        let mut ready = self
            .replicas
            .iter()
            .filter(|(id, r)| matches!(r.state, State::Ready(_)) && !to_stop.contains(id))
            .count();
        let mut old: Vec<(&u64, &Replica)> = self
            .replicas
            .iter()
            .filter(|(_, r)| active(r) && !is_new(r))
            .collect();
        old.sort_by_key(|(id, r)| (matches!(r.state, State::Ready(_)), **id));
        for (id, r) in old {
            if !matches!(r.state, State::Ready(_)) {
                to_stop.push(*id);
            } else if ready > want {
                ready -= 1;
                to_stop.push(*id);
            }
        }

        for id in &to_stop {
            if let Some(r) = self.replicas.get_mut(id) {
                info!(replica = %r.name, "stopping replica");
                r.state = State::Stopping;
            }
        }
        // Out of the endpoints before the replica starts draining.
        self.publish();
        for id in to_stop {
            if let Some(r) = self.replicas.get(&id) {
                let _ = r.stop.send(Stop::Drain);
            }
        }
    }

    fn start(&mut self, revision: u64, template: Arc<ReplicaTemplate>) {
        let id = self.next_id;
        self.next_id += 1;
        let name = format!("{}-{id}", self.key.name);
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let ctx = ReplicaCtx {
            display: format!("{}/{name}", self.key.namespace),
            name: name.clone(),
            id,
            template,
            events: self.events_tx.clone(),
            in_flight: self.inner.in_flight_fn(),
            output: self.inner.output.clone(),
        };
        info!(replica = %name, revision, "starting replica");
        let handle = self.tasks.spawn(replica::run(ctx, stop_rx));
        self.task_ids.insert(handle.id(), id);
        self.replicas.insert(
            id,
            Replica {
                revision,
                name,
                state: State::Starting,
                stop,
                pid: None,
                port: None,
                failure: None,
            },
        );
    }

    fn on_event(&mut self, id: u64, event: ReplicaEvent) {
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        match event {
            ReplicaEvent::Started { pid, port } => {
                r.pid = Some(pid);
                r.port = Some(port);
            }
            ReplicaEvent::Ready(addr) => {
                if r.state != State::Stopping {
                    r.state = State::Ready(addr);
                }
                r.failure = None;
            }
            ReplicaEvent::NotReady => {
                if r.state != State::Stopping {
                    r.state = State::Starting;
                }
            }
            ReplicaEvent::Failed {
                reason,
                message,
                failures,
            } => {
                if r.state != State::Stopping {
                    r.state = State::Starting;
                }
                r.pid = None;
                r.failure = Some(Failure {
                    reason,
                    message,
                    failures,
                });
            }
        }
        self.publish();
    }

    fn on_exit(&mut self, done: Result<(tokio::task::Id, u64), tokio::task::JoinError>) {
        let id = match done {
            Ok((task, id)) => {
                self.task_ids.remove(&task);
                id
            }
            Err(e) => {
                warn!(error = %e, "a replica task failed");
                match self.task_ids.remove(&e.id()) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        self.replicas.remove(&id);
        self.publish();
    }

    /// Reports ready endpoints, counts and the start-up failure (if no replica is ready)
    /// to the platform.
    fn publish(&self) {
        let mut endpoints = Vec::new();
        let mut processes = Vec::new();
        let mut failure: Option<&Failure> = None;
        for r in self.replicas.values() {
            if let State::Ready(addr) = r.state {
                endpoints.push(Endpoint {
                    addr,
                    name: r.name.clone(),
                });
            }
            if r.state != State::Stopping
                && let Some(f) = r.failure.as_ref().filter(|f| f.is_persistent())
            {
                failure = Some(f);
            }
            processes.push(ProcessView {
                name: r.name.clone(),
                pid: r.pid,
                port: r.port,
                state: match r.state {
                    State::Starting => "starting",
                    State::Ready(_) => "ready",
                    State::Stopping => "stopping",
                },
                revision: r.revision,
            });
        }
        let replicas = self
            .replicas
            .values()
            .filter(|r| r.state != State::Stopping)
            .count() as u32;
        let failure = if endpoints.is_empty() {
            failure.map(|f| (f.reason.to_string(), f.message.clone()))
        } else {
            None
        };
        self.inner.publish(
            &self.key,
            ReplicaSetView {
                endpoints,
                replicas,
                failure,
                processes,
            },
        );
    }
}
