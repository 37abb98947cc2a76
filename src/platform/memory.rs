//! A programmable in-memory [`Platform`] for tests: push Function, endpoint and
//! candidate events by hand, count wakes, scale changes and open candidate watches, make
//! wakes fail. Subscribers get a `Reset` of the
//! current state first and every later change in order, like a real watch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};

use super::{
    AutoscalerStatus, Candidate, Endpoint, EndpointsEvent, FunctionEvent, Platform, PlatformError,
    Scale, WakeOutcome,
};
use crate::api::{Function, FunctionKey};

/// One recorded call of [`Platform::set_scale`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleCall {
    pub key: FunctionKey,
    pub replicas: u32,
    pub reason: String,
}

#[derive(Default)]
struct State {
    functions: BTreeMap<FunctionKey, Arc<Function>>,
    endpoints: BTreeMap<FunctionKey, Vec<Endpoint>>,
    desired: BTreeMap<FunctionKey, u32>,
    versions: u64,
    wakes: Vec<(FunctionKey, u32)>,
    failing_wakes: usize,
    scale_calls: Vec<ScaleCall>,
    statuses: BTreeMap<FunctionKey, AutoscalerStatus>,
    stopping: BTreeMap<FunctionKey, Vec<std::net::IpAddr>>,
    function_subscribers: Vec<mpsc::UnboundedSender<FunctionEvent>>,
    endpoint_subscribers: Vec<mpsc::UnboundedSender<EndpointsEvent>>,
    candidates: BTreeMap<FunctionKey, Vec<Candidate>>,
    candidate_subscribers: Vec<(FunctionKey, mpsc::UnboundedSender<Vec<Candidate>>)>,
    candidate_watches_opened: BTreeMap<FunctionKey, usize>,
}

/// An in-memory platform. Cheap to clone through its `Arc`; every method is synchronous
/// except the [`Platform`] ones.
#[derive(Default)]
pub struct MemoryPlatform {
    state: Mutex<State>,
    wake_count: watch::Sender<usize>,
}

impl MemoryPlatform {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in a test while holding the lock must not hide the original failure.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says which replica addresses of a Function are being stopped (for drains).
    pub fn set_stopping(&self, key: &FunctionKey, ips: Vec<std::net::IpAddr>) {
        self.state().stopping.insert(key.clone(), ips);
    }

    /// Creates or changes a Function (status included).
    pub fn apply_function(&self, function: Function) {
        let f = Arc::new(function);
        let mut s = self.state();
        s.functions.insert(f.key(), f.clone());
        s.function_subscribers
            .retain(|tx| tx.send(FunctionEvent::Applied(f.clone())).is_ok());
    }

    /// Deletes a Function.
    pub fn delete_function(&self, key: &FunctionKey) {
        let mut s = self.state();
        s.functions.remove(key);
        s.function_subscribers
            .retain(|tx| tx.send(FunctionEvent::Deleted(key.clone())).is_ok());
    }

    /// Sends every subscriber a `Reset` of the current Functions and endpoints, as a
    /// watch does after a re-list.
    pub fn relist(&self) {
        let mut s = self.state();
        let functions: Vec<_> = s.functions.values().cloned().collect();
        s.function_subscribers
            .retain(|tx| tx.send(FunctionEvent::Reset(functions.clone())).is_ok());
        let endpoints: Vec<_> = s
            .endpoints
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        s.endpoint_subscribers
            .retain(|tx| tx.send(EndpointsEvent::Reset(endpoints.clone())).is_ok());
    }

    /// Sets the ready endpoints of a Function (empty: none ready).
    pub fn set_endpoints(&self, key: &FunctionKey, endpoints: Vec<Endpoint>) {
        let mut s = self.state();
        if endpoints.is_empty() {
            s.endpoints.remove(key);
        } else {
            s.endpoints.insert(key.clone(), endpoints.clone());
        }
        s.endpoint_subscribers.retain(|tx| {
            tx.send(EndpointsEvent::Updated(key.clone(), endpoints.clone()))
                .is_ok()
        });
    }

    /// Sets the candidates of a Function (its started, maybe not yet ready replicas), as
    /// a pod watch would report them.
    pub fn set_candidates(&self, key: &FunctionKey, candidates: Vec<Candidate>) {
        let mut s = self.state();
        s.candidates.insert(key.clone(), candidates.clone());
        s.candidate_subscribers
            .retain(|(k, tx)| k != key || tx.send(candidates.clone()).is_ok());
    }

    /// Candidate streams of a Function open now (not yet dropped by the activator).
    pub fn candidate_watches(&self, key: &FunctionKey) -> usize {
        let mut s = self.state();
        s.candidate_subscribers.retain(|(_, tx)| !tx.is_closed());
        s.candidate_subscribers
            .iter()
            .filter(|(k, _)| k == key)
            .count()
    }

    /// Candidate streams of a Function opened so far.
    pub fn candidate_watches_opened(&self, key: &FunctionKey) -> usize {
        self.state()
            .candidate_watches_opened
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The ready endpoints of a Function now.
    pub fn endpoints_of(&self, key: &FunctionKey) -> Vec<Endpoint> {
        self.state().endpoints.get(key).cloned().unwrap_or_default()
    }

    /// Makes the next `n` wakes fail (with [`PlatformError::Other`]).
    pub fn fail_next_wakes(&self, n: usize) {
        self.state().failing_wakes = n;
    }

    /// Every wake call so far, failed ones included, in order.
    pub fn wakes(&self) -> Vec<(FunctionKey, u32)> {
        self.state().wakes.clone()
    }

    /// Number of wake calls for one Function, failed ones included.
    pub fn wake_count(&self, key: &FunctionKey) -> usize {
        self.state().wakes.iter().filter(|(k, _)| k == key).count()
    }

    /// Waits until at least `n` wake calls (of any Function) have been made.
    pub async fn wait_for_wakes(&self, n: usize) {
        let mut rx = self.wake_count.subscribe();
        // The sender lives as long as `self`, so this only ends when the count is reached.
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Replicas asked for now (by wakes and `set_scale`).
    pub fn desired(&self, key: &FunctionKey) -> u32 {
        self.state().desired.get(key).copied().unwrap_or(0)
    }

    /// Every `set_scale` call so far.
    pub fn scale_calls(&self) -> Vec<ScaleCall> {
        self.state().scale_calls.clone()
    }

    /// The last autoscaler status published for a Function.
    pub fn autoscaler_status(&self, key: &FunctionKey) -> Option<AutoscalerStatus> {
        self.state().statuses.get(key).cloned()
    }
}

#[async_trait]
impl Platform for MemoryPlatform {
    async fn stopping_replicas(
        &self,
        key: &FunctionKey,
    ) -> Result<Vec<std::net::IpAddr>, PlatformError> {
        Ok(self.state().stopping.get(key).cloned().unwrap_or_default())
    }

    fn functions(&self) -> BoxStream<'static, FunctionEvent> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = self.state();
        let all = s.functions.values().cloned().collect();
        let _ = tx.send(FunctionEvent::Reset(all));
        s.function_subscribers.push(tx);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    fn endpoints(&self) -> BoxStream<'static, EndpointsEvent> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = self.state();
        let all = s
            .endpoints
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let _ = tx.send(EndpointsEvent::Reset(all));
        s.endpoint_subscribers.push(tx);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    fn candidates(
        &self,
        key: &FunctionKey,
        _port: u16,
    ) -> Option<BoxStream<'static, Vec<Candidate>>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = self.state();
        let now = s.candidates.get(key).cloned().unwrap_or_default();
        let _ = tx.send(now);
        s.candidate_subscribers.push((key.clone(), tx));
        *s.candidate_watches_opened.entry(key.clone()).or_default() += 1;
        Some(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn wake(&self, key: &FunctionKey, replicas: u32) -> Result<WakeOutcome, PlatformError> {
        let outcome = {
            let mut s = self.state();
            s.wakes.push((key.clone(), replicas));
            if s.failing_wakes > 0 {
                s.failing_wakes -= 1;
                Err(PlatformError::Other(format!(
                    "injected wake failure for {key}"
                )))
            } else if !s.functions.contains_key(key) {
                Err(PlatformError::NotFound(key.clone()))
            } else if s.desired.get(key).copied().unwrap_or(0) > 0 {
                Ok(WakeOutcome::AlreadyAwake)
            } else {
                s.desired.insert(key.clone(), replicas);
                s.versions += 1;
                Ok(WakeOutcome::Woken)
            }
        };
        self.wake_count.send_modify(|c| *c += 1);
        outcome
    }

    async fn scale(&self, key: &FunctionKey) -> Result<Scale, PlatformError> {
        let s = self.state();
        if !s.functions.contains_key(key) {
            return Err(PlatformError::NotFound(key.clone()));
        }
        Ok(Scale {
            desired: s.desired.get(key).copied().unwrap_or(0),
            ready: s.endpoints.get(key).map_or(0, |e| e.len() as u32),
            version: Some(s.versions.to_string()),
        })
    }

    async fn set_scale(
        &self,
        key: &FunctionKey,
        replicas: u32,
        expected_version: Option<&str>,
        reason: &str,
    ) -> Result<(), PlatformError> {
        let mut s = self.state();
        if !s.functions.contains_key(key) {
            return Err(PlatformError::NotFound(key.clone()));
        }
        if let Some(v) = expected_version
            && v != s.versions.to_string()
        {
            return Err(PlatformError::Conflict(key.clone()));
        }
        s.desired.insert(key.clone(), replicas);
        s.versions += 1;
        s.scale_calls.push(ScaleCall {
            key: key.clone(),
            replicas,
            reason: reason.to_string(),
        });
        Ok(())
    }

    async fn publish_autoscaler_status(
        &self,
        key: &FunctionKey,
        status: &AutoscalerStatus,
    ) -> Result<(), PlatformError> {
        self.state().statuses.insert(key.clone(), status.clone());
        Ok(())
    }
}
