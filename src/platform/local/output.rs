//! The terminal output of `zeroscale dev`: replica lines prefixed `[ns/name-N]`, and the
//! banner. One writer thread owns stdout and stderr, so lines from many replicas never
//! interleave mid-line and no async task blocks on a slow terminal.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

/// Which stream a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

enum Message {
    Line(Stream, String),
    Flush(oneshot::Sender<()>),
}

/// A handle to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Output")
    }
}

/// Lines written to an in-memory sink (tests).
pub type Captured = Arc<Mutex<Vec<(Stream, String)>>>;

impl Output {
    /// Writes to this process's stdout and stderr from a dedicated thread.
    pub fn terminal() -> Self {
        let (tx, mut rx) = mpsc::channel::<Message>(1024);
        let spawned = std::thread::Builder::new()
            .name("dev-output".into())
            .spawn(move || {
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Message::Line(Stream::Stdout, line) => {
                            let mut out = std::io::stdout().lock();
                            let _ = writeln!(out, "{line}");
                            let _ = out.flush();
                        }
                        Message::Line(Stream::Stderr, line) => {
                            let mut err = std::io::stderr().lock();
                            let _ = writeln!(err, "{line}");
                        }
                        Message::Flush(done) => {
                            let _ = std::io::stdout().flush();
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the output thread; replica output is lost");
        }
        Self { tx }
    }

    /// Collects lines in memory instead (tests).
    pub fn capture() -> (Self, Captured) {
        let (tx, mut rx) = mpsc::channel::<Message>(1024);
        let lines: Captured = Arc::default();
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    Message::Line(stream, line) => {
                        if let Ok(mut l) = sink.lock() {
                            l.push((stream, line));
                        }
                    }
                    Message::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        (Self { tx }, lines)
    }

    /// Writes one line, waiting when the terminal is behind (back-pressure reaches the
    /// replica through its pipe instead of growing memory).
    pub async fn line(&self, stream: Stream, line: String) {
        let _ = self.tx.send(Message::Line(stream, line)).await;
    }

    /// Waits until everything sent so far is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}
