//! Events on Functions (`events.k8s.io/v1`), with the series of repeats bounded in memory.
//!
//! The same Event again within [`SERIES_WINDOW`] joins the Event sent before as a series
//! (one object whose `series.count` grows, as `kubectl describe` shows "x3 over 2m")
//! instead of becoming a new object. To know what it sent, kube's `Recorder` keeps every
//! Event object it sent and prunes them only when it sends the next one: after 10,000
//! Functions are created together, each one's `Created` Event stays in memory, about
//! 3 KB per Function with its map (measured with heaptrack, issue 16). So the series are
//! kept here instead, as client-go's correlator does, in a bounded map: per Event only a
//! 64-bit hash of what makes two Events the same (type, action, reason, note, the object
//! referred to, the reporter), the name of the object it became, its count and when it
//! was last seen; at most [`MAX_SERIES`] of them, the oldest forgotten first, and none
//! older than the window. A forgotten repeat is only a new Event object, never a lost one.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use serde_json::json;
use tokio::time::Instant;

/// How long after it was last seen a repeat still joins an Event's series (kube's
/// recorder and client-go use the same six minutes).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// The most Event series remembered at once (client-go's correlator keeps as many).
pub const MAX_SERIES: usize = 4096;

/// Publishes Events; see the module docs.
pub struct Events {
    client: kube::Client,
    reporter: Reporter,
    series: Mutex<SeriesCache>,
}

/// What became of an Event, as [`SeriesCache::observe`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Not seen within the window: a new Event object.
    New,
    /// A repeat: the Event object `name` now counts `count`.
    Repeat { name: Box<str>, count: i32 },
}

#[derive(Debug)]
struct Series {
    name: Box<str>,
    count: i32,
    last: Instant,
}

/// The remembered series, by the hash of what identifies an Event.
#[derive(Debug, Default)]
pub struct SeriesCache {
    series: HashMap<u64, Series>,
}

impl SeriesCache {
    /// Whether the Event `key` seen `now` repeats one within the window; counts it if so.
    pub fn observe(&mut self, key: u64, now: Instant) -> Observed {
        match self.series.get_mut(&key) {
            Some(s) if now.saturating_duration_since(s.last) < SERIES_WINDOW => {
                s.count = s.count.saturating_add(1);
                s.last = now;
                Observed::Repeat {
                    name: s.name.clone(),
                    count: s.count,
                }
            }
            _ => Observed::New,
        }
    }

    /// Remembers that the Event `key` became the object `name` at `now`.
    pub fn remember(&mut self, key: u64, name: &str, now: Instant) {
        if self.series.len() >= MAX_SERIES && !self.series.contains_key(&key) {
            self.series
                .retain(|_, s| now.saturating_duration_since(s.last) < SERIES_WINDOW);
            if self.series.len() >= MAX_SERIES {
                let oldest = self
                    .series
                    .iter()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.series.remove(&k);
                }
            }
        }
        self.series.insert(
            key,
            Series {
                name: name.into(),
                count: 1,
                last: now,
            },
        );
    }

    /// Forgets the series not seen within the window, and gives their memory back.
    pub fn prune(&mut self, now: Instant) {
        self.series
            .retain(|_, s| now.saturating_duration_since(s.last) < SERIES_WINDOW);
        self.series.shrink_to_fit();
    }

    /// Series remembered.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

impl Events {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            series: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeriesCache> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What makes two Events the same one. The note too: an Event's note cannot change
    /// once it is created, so a repeat with another note (the autoscaler's "scaled to 4"
    /// after "scaled to 1") is a new Event, or `kubectl describe` would show the first
    /// note counted for both.
    fn key(&self, event: &Event, reference: &ObjectReference) -> u64 {
        let mut h = DefaultHasher::new();
        matches!(event.type_, EventType::Warning).hash(&mut h);
        event.action.hash(&mut h);
        event.reason.hash(&mut h);
        event.note.hash(&mut h);
        self.reporter.controller.hash(&mut h);
        self.reporter.instance.hash(&mut h);
        for r in std::iter::once(reference).chain(event.secondary.as_ref()) {
            r.api_version.hash(&mut h);
            r.kind.hash(&mut h);
            r.namespace.hash(&mut h);
            r.name.hash(&mut h);
            r.uid.hash(&mut h);
        }
        h.finish()
    }

    /// Sends `event` about `reference`, or counts it in the series of the same Event.
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) -> kube::Result<()> {
        let key = self.key(event, reference);
        let namespace = reference.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let now = Instant::now();
        let observed = self.lock().observe(key, now);
        if let Observed::Repeat { name, count } = observed {
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(jiff::Timestamp::now()),
            };
            let patch = json!({ "series": series });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                // Gone (the API server keeps Events an hour, or someone deleted it):
                // start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let object = self.object(event, reference);
        let name = object.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &object).await?;
        self.lock().remember(key, &name, now);
        Ok(())
    }

    fn object(&self, event: &Event, reference: &ObjectReference) -> K8sEvent {
        let now = jiff::Timestamp::now();
        let controller = &self.reporter.controller;
        K8sEvent {
            metadata: ObjectMeta {
                namespace: reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..K8sEvent::default()
        }
    }

    /// Forgets the series past the window; returns how many are left.
    pub fn prune(&self) -> usize {
        let mut cache = self.lock();
        cache.prune(Instant::now());
        cache.len()
    }

    /// Calls [`Events::prune`] every minute until `stop`.
    pub async fn prune_until(&self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => { self.prune(); }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeat_within_the_window_counts_in_its_series() {
        let mut cache = SeriesCache::default();
        let t0 = Instant::now();
        assert_eq!(cache.observe(7, t0), Observed::New);
        cache.remember(7, "web.17", t0);
        let t1 = t0 + Duration::from_secs(300);
        assert_eq!(
            cache.observe(7, t1),
            Observed::Repeat {
                name: "web.17".into(),
                count: 2
            }
        );
        // The window runs from the last repeat, not from the first Event.
        let t2 = t1 + Duration::from_secs(300);
        assert_eq!(
            cache.observe(7, t2),
            Observed::Repeat {
                name: "web.17".into(),
                count: 3
            }
        );
        assert_eq!(cache.observe(7, t2 + SERIES_WINDOW), Observed::New);
        assert_eq!(cache.observe(8, t2), Observed::New, "another Event");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded_and_forgets_the_oldest_first() {
        let mut cache = SeriesCache::default();
        let t0 = Instant::now();
        for key in 0..MAX_SERIES as u64 + 100 {
            cache.remember(key, "f.1", t0 + Duration::from_millis(key));
        }
        assert_eq!(cache.len(), MAX_SERIES);
        assert_eq!(cache.observe(0, t0 + Duration::from_secs(5)), Observed::New);
        assert!(matches!(
            cache.observe(MAX_SERIES as u64 + 99, t0 + Duration::from_secs(5)),
            Observed::Repeat { .. }
        ));

        cache.prune(t0 + SERIES_WINDOW + Duration::from_secs(10));
        assert!(cache.is_empty(), "nothing outlives the window");
    }
}
