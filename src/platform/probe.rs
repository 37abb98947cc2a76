//! Readiness checks run from outside a replica, the way the kubelet runs its `tcpSocket`
//! and `httpGet` probes: a TCP connect, or an HTTP/1.1 GET whose 2xx or 3xx answer
//! passes. Used by the activator on candidates (`activator::early`) and by `dev` on its
//! local replicas.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::ReadinessCheck;

/// The `User-Agent` of the activator's checks: the kubelet's prefix, so an app that
/// recognises its probes (to skip logging or authentication) answers them the same way.
pub const ACTIVATOR_USER_AGENT: &str = "kube-probe/zeroscale-activator";

/// Connects to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: timed out after {timeout:?}")),
    }
}

/// GET `path` on a connected stream to `addr` (`Host: <addr>`, as the kubelet sends it,
/// unless `headers` name another); a 2xx or 3xx status passes. The body is not read.
pub async fn http_get(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    user_agent: &str,
) -> Result<(), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut request = http::Request::get(path)
        .header(http::header::USER_AGENT, user_agent)
        .header(http::header::ACCEPT, "*/*")
        .header(http::header::CONNECTION, "close");
    let mut host = false;
    for (name, value) in headers {
        host |= name.eq_ignore_ascii_case("host");
        request = request.header(name.as_str(), value.as_str());
    }
    if !host {
        request = request.header(http::header::HOST, addr.to_string());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let result = sender.send_request(request).await;
    conn.abort();
    let response = result.map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("GET {path}: {status}"))
    }
}

impl ReadinessCheck {
    /// Runs the check against the replica at `ip`: the connect within `connect_timeout`,
    /// the whole check within `timeout`.
    pub async fn run(
        &self,
        ip: IpAddr,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<(), String> {
        let attempt = async {
            match self {
                ReadinessCheck::Tcp { port } => {
                    connect(SocketAddr::new(ip, *port), connect_timeout)
                        .await
                        .map(drop)
                }
                ReadinessCheck::Http {
                    port,
                    path,
                    headers,
                } => {
                    let addr = SocketAddr::new(ip, *port);
                    let stream = connect(addr, connect_timeout).await?;
                    http_get(stream, addr, path, headers, ACTIVATOR_USER_AGENT).await
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const SHORT: Duration = Duration::from_millis(500);

    /// An HTTP server answering `status` to every request, and the headers it saw.
    async fn server(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<http::HeaderMap>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let _ = tx.send(req.headers().clone());
                        async move {
                            let mut r = http::Response::new(Empty::<Bytes>::new());
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn http_passes_on_2xx_and_3xx_only_and_sends_the_kubelets_headers() {
        for (status, passes) in [(200, true), (302, true), (404, false), (503, false)] {
            let (port, mut seen) = server(status).await;
            let check = ReadinessCheck::Http {
                port,
                path: "/healthz".into(),
                headers: vec![("X-Probe".into(), "1".into())],
            };
            assert_eq!(
                check.run(LOCAL, SHORT, SHORT).await.is_ok(),
                passes,
                "{status}"
            );
            let h = seen.recv().await.unwrap();
            assert_eq!(h["host"], format!("127.0.0.1:{port}").as_str());
            assert_eq!(h["x-probe"], "1");
            assert!(h["user-agent"].to_str().unwrap().starts_with("kube-probe/"));
        }
    }

    #[tokio::test]
    async fn tcp_follows_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let check = ReadinessCheck::Tcp { port };
        assert!(check.run(LOCAL, SHORT, SHORT).await.is_ok());
        drop(listener);
        assert!(check.run(LOCAL, SHORT, SHORT).await.is_err());
    }
}
