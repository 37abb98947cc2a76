//! The boundary between zeroscale's data plane / autoscaler and the place replicas run.
//!
//! The activator and the autoscaler need four things of a platform: the Functions, the
//! ready endpoints of each Function, a way to wake a Function from zero, and a way to
//! set its replica count. [`kube::KubePlatform`] provides them on a cluster (watches,
//! the Deployment scale subresource); [`local::LocalPlatform`] provides them in
//! `zeroscale dev` (processes on this machine). Neither caller knows which it runs on.
//!
//! A fifth, optional: the [`Candidate`]s of a waking Function, replicas that have an
//! address but that the platform does not call ready yet, with the check that tells
//! when they are. The activator probes them itself to serve a cold start before the
//! ready endpoints catch up (see `activator::early`). A platform whose ready endpoints
//! are already as fast as a probe (`dev`) offers none.

pub mod client;
pub mod directory;
pub mod kube;
pub mod local;
pub mod memory;
pub mod probe;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::api::{Function, FunctionKey};

/// A change to the set of Functions.
#[derive(Debug, Clone)]
pub enum FunctionEvent {
    /// A Function was created or changed (status changes included).
    Applied(Arc<Function>),
    /// A Function was deleted.
    Deleted(FunctionKey),
    /// The complete set after a (re-)list: the truth, replacing everything known before.
    Reset(Vec<Arc<Function>>),
}

/// A replica that can take requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Where to send requests (pod IP and container port, or 127.0.0.1 and a local port).
    pub addr: SocketAddr,
    /// A stable name for logs and metrics (the pod name, or `<function>-<n>` locally).
    pub name: String,
}

/// A change to the ready endpoints of Functions. Each event carries a full set.
#[derive(Debug, Clone)]
pub enum EndpointsEvent {
    /// The ready endpoints of one Function, all of them (empty: none ready).
    Updated(FunctionKey, Vec<Endpoint>),
    /// Every Function's ready endpoints after a (re-)list; Functions absent have none.
    Reset(Vec<(FunctionKey, Vec<Endpoint>)>),
}

/// A check the activator can run from outside a replica that passes exactly when the
/// platform's own readiness check would (the kubelet's `httpGet` and `tcpSocket` probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadinessCheck {
    /// A TCP connect to this port of the replica's address.
    Tcp { port: u16 },
    /// An HTTP/1.1 GET of `path` on this port: a 2xx or 3xx answer passes.
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
}

/// A replica of a waking Function that the platform has started (it has an address) but
/// may not call ready yet: on Kubernetes, a pod of the Function with a `status.podIP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its name, the same as its [`Endpoint::name`] once the platform lists it ready.
    pub name: String,
    /// Where it serves the Function (pod IP and the Function's port).
    pub addr: SocketAddr,
    /// What must pass, all of it, before it may take requests. `None`: its readiness
    /// cannot be checked from outside (an `exec` or `grpc` probe, readiness gates, a
    /// sidecar not running yet), so it waits for the platform's ready endpoints.
    pub checks: Option<Vec<ReadinessCheck>>,
    /// Longest one check may take (the probe's `timeoutSeconds`).
    pub timeout: Duration,
    /// Consecutive passes of every check it needs (the probe's `successThreshold`).
    pub success_threshold: u32,
    /// How long the platform may take to list it ready once the checks pass (its probes'
    /// delays and periods, plus propagation). Used early for longer, the activator takes
    /// it as a disagreement and leaves the replica to the platform's verdict.
    pub agree_within: Duration,
    /// It is being deleted or has finished: never to be used.
    pub terminating: bool,
}

/// The replica counts of a Function as the platform sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scale {
    /// Replicas asked for (Deployment `spec.replicas`).
    pub desired: u32,
    /// Replicas that are ready.
    pub ready: u32,
    /// An opaque version for optimistic concurrency (the scale's `resourceVersion`).
    pub version: Option<String>,
}

/// What a wake did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// Replicas went from zero to the requested count.
    Woken,
    /// The Function already had replicas asked for; nothing was changed.
    AlreadyAwake,
}

/// Why a platform call failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("function {0} not found")]
    NotFound(FunctionKey),
    #[error("scale of {0} changed concurrently")]
    Conflict(FunctionKey),
    #[error("kubernetes API: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("{0}")]
    Other(String),
}

/// The platform a data plane and an autoscaler run against.
#[async_trait]
pub trait Platform: Send + Sync + 'static {
    /// The Functions, starting with a [`FunctionEvent::Reset`] of all of them. The stream
    /// never ends while the platform lives; it re-lists (another `Reset`) after a gap.
    fn functions(&self) -> BoxStream<'static, FunctionEvent>;

    /// The ready endpoints of every Function, starting with an [`EndpointsEvent::Reset`].
    fn endpoints(&self) -> BoxStream<'static, EndpointsEvent>;

    /// The [`Candidate`]s of Function `key` (serving on `port`), each item the complete
    /// current set, from the moment they have an address. Asked for only while a Function
    /// wakes and dropped once its ready endpoints catch up, so a platform may watch only
    /// then. `None`: this platform has none to offer.
    fn candidates(
        &self,
        key: &FunctionKey,
        port: u16,
    ) -> Option<BoxStream<'static, Vec<Candidate>>> {
        let _ = (key, port);
        None
    }

    /// Wakes a Function at zero: sets its replicas to `replicas` only if they are 0 now,
    /// with optimistic concurrency, so concurrent wakes from several activators and the
    /// autoscaler never fight. Safe to call again (returns `AlreadyAwake`).
    async fn wake(&self, key: &FunctionKey, replicas: u32) -> Result<WakeOutcome, PlatformError>;

    /// The current replica counts of a Function.
    async fn scale(&self, key: &FunctionKey) -> Result<Scale, PlatformError>;

    /// Sets the replicas of a Function. With `expected_version`, fails with
    /// [`PlatformError::Conflict`] when the scale changed since it was read. `reason` is
    /// recorded (an Event on Kubernetes, a log line locally).
    async fn set_scale(
        &self,
        key: &FunctionKey,
        replicas: u32,
        expected_version: Option<&str>,
        reason: &str,
    ) -> Result<(), PlatformError>;

    /// The addresses of a Function's replicas that are being stopped (their pods have
    /// begun terminating), read fresh from the platform: a drain waits until no activator
    /// routes to them or has a request in flight to them. A platform that drains its
    /// replicas itself before stopping them (`dev`) has none to report.
    async fn stopping_replicas(
        &self,
        key: &FunctionKey,
    ) -> Result<Vec<std::net::IpAddr>, PlatformError> {
        let _ = key;
        Ok(Vec::new())
    }

    /// Publishes what the autoscaler decided on the Function's status.
    async fn publish_autoscaler_status(
        &self,
        key: &FunctionKey,
        status: &AutoscalerStatus,
    ) -> Result<(), PlatformError>;
}

/// The autoscaler's part of a Function's status.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalerStatus {
    pub desired_replicas: u32,
    pub last_request_time: Option<jiff::Timestamp>,
}
