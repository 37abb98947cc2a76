//! The data plane's threads: one per core, each a single-threaded tokio runtime that runs
//! the client connections handed to it, from their first byte to their last, with the
//! upstream connections they open (see `pool`). This is nginx's model (a worker per
//! core, an event loop each) inside one process.
//!
//! Why not the process's work-stealing runtime: a proxied request is a chain of small
//! tasks (the client connection, the replica connection's driver, the wake-ups between
//! them) that a work-stealing scheduler spreads over cores, with the cross-core
//! wake-ups, shared run queues and cache traffic that go with it. Measured with the
//! harness at c=64 on 2 shared cores, the same code took about 6% less CPU per request
//! this way (20% less on a single thread serving everything, which cannot use a
//! second core); BENCHMARKS.md has the figures. The control plane (watches, the admin
//! endpoint, the autoscaler in `dev`) stays on the process's runtime, which also
//! accepts connections and hands each to the thread with the fewest open (no
//! SO_REUSEPORT: a second process could then bind the same port and silently take half
//! the traffic). Requests of every thread share the routing table, queues, balancer
//! counters and stats through the same atomics and locks as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::warn;

use super::client::DrainWatch;

/// A client connection handed to a worker.
pub(crate) struct Handoff {
    pub(crate) stream: std::net::TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) drain: DrainWatch,
    /// Counts it among its worker's open connections until dropped.
    pub(crate) open: OpenConn,
}

/// One connection counted in its worker's load.
pub(crate) struct OpenConn(Arc<AtomicUsize>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Worker {
    tx: mpsc::UnboundedSender<Handoff>,
    open: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

/// The running workers.
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `n` threads; `serve` runs on a worker's runtime for each connection handed
    /// to it (and spawns what it needs there).
    pub(crate) fn start<F>(n: usize, serve: F) -> std::io::Result<Self>
    where
        F: Fn(TcpStream, SocketAddr, DrainWatch, OpenConn) + Clone + Send + 'static,
    {
        let mut workers = Vec::with_capacity(n);
        for index in 0..n {
            let (tx, mut rx) = mpsc::unbounded_channel::<Handoff>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let serve = serve.clone();
            let thread = std::thread::Builder::new()
                .name(format!("data-plane-{index}"))
                .spawn(move || {
                    super::pool::set_worker(index);
                    runtime.block_on(async move {
                        while let Some(h) = rx.recv().await {
                            match TcpStream::from_std(h.stream) {
                                Ok(stream) => serve(stream, h.peer, h.drain, h.open),
                                Err(e) => warn!(error = %e, "registering a client connection"),
                            }
                        }
                    });
                    // Dropping the runtime cuts what is still running on it: the drain
                    // (or its timeout) is over when the channel closes.
                })?;
            workers.push(Worker {
                tx,
                open: Arc::new(AtomicUsize::new(0)),
                thread,
            });
        }
        Ok(Self { workers })
    }

    /// Hands a connection to the worker with the fewest open ones.
    pub(crate) fn hand_off(&self, stream: TcpStream, peer: SocketAddr, drain: DrainWatch) {
        let Some(w) = self
            .workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, %peer, "handing a client connection over");
                return;
            }
        };
        w.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenConn(w.open.clone());
        let _ = w.tx.send(Handoff {
            stream,
            peer,
            drain,
            open,
        });
    }

    /// Stops the threads (after the drain) and waits for them.
    pub(crate) async fn stop(self) {
        let threads: Vec<JoinHandle<()>> = self
            .workers
            .into_iter()
            .map(|w| {
                drop(w.tx);
                w.thread
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}
