//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews every `retry_period`; a candidate takes the Lease once it has seen the
//! same record unchanged for `lease_duration` (its own clock, so clock skew between
//! nodes does not matter); a leader that cannot renew within `renew_deadline` steps
//! down before anyone else may take over. Writes use the Lease's resourceVersion, so two
//! candidates never both win. The API behind a [`LeaseStore`] is swappable for tests.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a failing Lease call is logged as a warning.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Why a Lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else wrote the Lease first (409), or created it first.
    #[error("the lease changed concurrently")]
    Conflict,
    #[error("lease API: {0}")]
    Api(#[source] kube::Error),
}

/// Where the Lease lives.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    async fn get(&self) -> Result<Option<Lease>, LeaseError>;
    async fn create(&self, lease: Lease) -> Result<Lease, LeaseError>;
    /// Replaces the Lease; fails with `Conflict` when its resourceVersion is stale.
    async fn replace(&self, lease: Lease) -> Result<Lease, LeaseError>;
}

/// A Lease in the Kubernetes API.
pub struct KubeLeaseStore {
    api: Api<Lease>,
    name: String,
}

impl KubeLeaseStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }
}

fn lease_error(e: kube::Error) -> LeaseError {
    match e {
        kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
        other => LeaseError::Api(other),
    }
}

#[async_trait]
impl LeaseStore for KubeLeaseStore {
    async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.api.get_opt(&self.name).await.map_err(LeaseError::Api)
    }
    async fn create(&self, mut lease: Lease) -> Result<Lease, LeaseError> {
        lease.metadata.name = Some(self.name.clone());
        self.api
            .create(&PostParams::default(), &lease)
            .await
            .map_err(lease_error)
    }
    async fn replace(&self, lease: Lease) -> Result<Lease, LeaseError> {
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(lease_error)
    }
}

/// Timing of the election (client-go's defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (< lease_duration).
    pub renew_deadline: Duration,
    /// How often to renew, or to try to acquire.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A candidate for leadership.
pub struct Elector<S> {
    store: S,
    identity: String,
    timing: Timing,
    /// The record last seen and when it was first seen unchanged (by our clock).
    observed: Option<(LeaseSpec, Instant)>,
}

impl<S: LeaseStore> Elector<S> {
    pub fn new(store: S, identity: impl Into<String>, timing: Timing) -> Self {
        Self {
            store,
            identity: identity.into(),
            timing,
            observed: None,
        }
    }

    /// Runs until `shutdown`, publishing whether this candidate leads on `leading`. On
    /// shutdown a leader releases the Lease so a standby takes over at once. The caller
    /// must stop its leader-only work as soon as `leading` turns false.
    pub async fn run(mut self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut last_renewal: Option<Instant> = None;
        let mut last_warning: Option<Instant> = None;
        loop {
            let now = Instant::now();
            match self.try_acquire_or_renew(now).await {
                Ok(true) => {
                    last_renewal = Some(now);
                    if !*leading.borrow() {
                        info!(identity = %self.identity, "became the leader");
                        leading.send_replace(true);
                    }
                }
                Ok(false) => {
                    last_renewal = None;
                    if *leading.borrow() {
                        warn!(identity = %self.identity, "lost the lease to another candidate");
                        leading.send_replace(false);
                    }
                }
                Err(e) => {
                    // A candidate that can never reach its Lease (RBAC, wrong namespace)
                    // must say so, but not every retry period.
                    if last_warning.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                        warn!(error = %e, "reading or writing the leader lease failed");
                        last_warning = Some(now);
                    } else {
                        debug!(error = %e, "lease update failed");
                    }
                    let expired = last_renewal
                        .is_none_or(|t| now.duration_since(t) >= self.timing.renew_deadline);
                    if *leading.borrow() && expired {
                        warn!(error = %e, "could not renew the lease in time, stepping down");
                        leading.send_replace(false);
                        last_renewal = None;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            self.release().await;
        }
    }

    /// One round: returns whether this candidate holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, LeaseError> {
        let wall = MicroTime(jiff::Timestamp::now());
        let duration_secs = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(15);
        let Some(current) = self.store.get().await? else {
            let lease = Lease {
                metadata: ObjectMeta::default(),
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(wall.clone()),
                    renew_time: Some(wall),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let created = self.store.create(lease).await?;
            self.observe(&created, now);
            return Ok(true);
        };
        let spec = current.spec.clone().unwrap_or_default();
        self.observe(&current, now);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours && holder.is_some() {
            let duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
                .unwrap_or(self.timing.lease_duration);
            let seen_since = self.observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
            if now.duration_since(seen_since) < duration {
                return Ok(false);
            }
        }
        let mut next = spec.clone();
        next.holder_identity = Some(self.identity.clone());
        next.lease_duration_seconds = Some(duration_secs);
        next.renew_time = Some(wall.clone());
        if !ours {
            next.acquire_time = Some(wall);
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        let updated = self
            .store
            .replace(Lease {
                metadata: current.metadata.clone(),
                spec: Some(next),
            })
            .await?;
        self.observe(&updated, now);
        Ok(true)
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let spec = lease.spec.clone().unwrap_or_default();
        match &self.observed {
            Some((seen, _)) if *seen == spec => {}
            _ => self.observed = Some((spec, now)),
        }
    }

    /// Gives the Lease up (holder cleared, 1s duration) so a standby need not wait.
    async fn release(&mut self) {
        let Ok(Some(current)) = self.store.get().await else {
            return;
        };
        let mut spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self
            .store
            .replace(Lease {
                metadata: current.metadata,
                spec: Some(spec),
            })
            .await
        {
            Ok(_) => info!(identity = %self.identity, "released the lease"),
            Err(e) => warn!(error = %e, "releasing the lease failed"),
        }
    }
}
