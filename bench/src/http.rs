//! One-off HTTP/1.1 requests of the orchestrator: admin endpoints, readiness checks and
//! the timed cold-start requests (time to the response head measured on an already open
//! connection, so TCP set-up is not part of it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{Context, Result};

/// A response read in full, with the time from sending the request to its head.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From the request being handed to the connection to the response head.
    pub ttfb: Duration,
}

/// GET `path` with `host` from `addr` on a new connection, within `timeout`.
pub async fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Answer> {
    tokio::time::timeout(timeout, get_inner(addr, host, path))
        .await
        .context(format!("GET http://{addr}{path} (Host {host}) timed out"))?
}

async fn get_inner(addr: SocketAddr, host: &str, path: &str) -> Result<Answer> {
    let stream = TcpStream::connect(addr)
        .await
        .context(format!("connecting to {addr}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.ready().await.context("connection not ready")?;
    let req = Request::get(path)
        .header(header::HOST, host)
        .body(Empty::new())
        .context("building a request")?;
    let sent = Instant::now();
    let resp = sender
        .send_request(req)
        .await
        .context(format!("GET http://{addr}{path} (Host {host})"))?;
    let ttfb = sent.elapsed();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading a body")?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
        ttfb,
    })
}

/// Polls GET `path` until it answers `want`, within `limit`.
pub async fn wait_for_status(
    addr: SocketAddr,
    host: &str,
    path: &str,
    want: StatusCode,
    limit: Duration,
) -> Result<Answer> {
    let started = Instant::now();
    loop {
        let last = match get(addr, host, path, Duration::from_secs(5)).await {
            Ok(a) if a.status == want => return Ok(a),
            Ok(a) => format!("status {}", a.status),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > limit {
            return Err(crate::error::Error::msg(format!(
                "GET http://{addr}{path} (Host {host}) did not answer {want} within {limit:?}: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
