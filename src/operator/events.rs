//! Events on Functions, through kube's [`Recorder`], with a cache that does not outlive
//! its use.
//!
//! kube's recorder keeps every Event it has sent, so that the same Event again within
//! six minutes becomes a series (one object whose count grows) rather than a new object.
//! It prunes that cache only when it sends the next Event. So after 10,000 Functions are
//! created together, each one's `Created` Event (the whole object: metadata, the
//! reference, the note) stays in memory for as long as nothing else is recorded (issue
//! 16). [`Events`] starts over with a fresh recorder, an empty cache, once the current
//! one has sent nothing for the whole series window: no repeat could still join any of
//! the Events it remembers.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder, Reporter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long kube's recorder keeps an Event for a repeat to join it.
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Publishes Events; see the module docs.
pub struct Events {
    client: kube::Client,
    reporter: Reporter,
    current: Mutex<Current>,
}

struct Current {
    recorder: Recorder,
    last_sent: Instant,
}

impl Events {
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        Self {
            client,
            reporter,
            current: Mutex::new(Current {
                recorder,
                last_sent: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `event` about `reference` (or adds it to the series of the same Event).
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) -> kube::Result<()> {
        let recorder = {
            let mut current = self.lock();
            current.last_sent = Instant::now();
            current.recorder.clone()
        };
        recorder.publish(event, reference).await
    }

    /// Drops the remembered Events when nothing was sent for the series window; whether
    /// it did.
    pub fn forget_if_idle(&self) -> bool {
        let mut current = self.lock();
        if current.last_sent.elapsed() < SERIES_WINDOW {
            return false;
        }
        current.recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        current.last_sent = Instant::now();
        true
    }

    /// Calls [`Events::forget_if_idle`] every minute until `stop`.
    pub async fn forget_idle_until(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    if self.forget_if_idle() {
                        tracing::debug!("forgot the Events sent before the series window");
                    }
                }
            }
        }
    }
}
