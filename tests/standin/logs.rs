//! Container output: every line a container writes goes, whole, to its log file under the
//! state directory (`logs/<ns>_<pod>_<container>.log`, appended across restarts) and, with
//! `--echo-logs`, to the stand-in's stderr prefixed `[ns/pod/container]`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// Longest piece of output written as one line.
const MAX_LINE: u64 = 16 * 1024;

/// The log file of one container.
pub fn log_path(state_dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    state_dir
        .join("logs")
        .join(format!("{namespace}_{pod}_{container}.log"))
}

/// Where one container's output goes.
#[derive(Clone)]
pub struct Sink {
    file: Arc<Mutex<tokio::fs::File>>,
    echo: Option<Arc<str>>,
}

impl Sink {
    pub fn open(path: &Path, echo_prefix: Option<String>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(tokio::fs::File::from_std(file))),
            echo: echo_prefix.map(Into::into),
        })
    }

    /// Writes one line (a trailing newline is added when missing).
    pub async fn line(&self, mut line: Vec<u8>) {
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        {
            let mut file = self.file.lock().await;
            let _ = file.write_all(&line).await;
            let _ = file.flush().await;
        }
        if let Some(prefix) = &self.echo {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(format!("[{prefix}] ").as_bytes());
            let _ = err.write_all(&line);
        }
    }

    /// Copies `reader` line by line until it ends.
    pub async fn pump(self, reader: impl AsyncRead + Unpin) {
        let mut reader = BufReader::new(reader);
        loop {
            let mut line = Vec::new();
            match (&mut reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) => self.line(line).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_appended_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path(), "ns", "pod", "app");
        assert!(path.ends_with("logs/ns_pod_app.log"));
        let sink = Sink::open(&path, None).unwrap();
        sink.clone().pump(&b"one\ntwo"[..]).await;
        sink.pump(&b"three\n"[..]).await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\nthree\n");
    }
}
