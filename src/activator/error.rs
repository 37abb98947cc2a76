//! Why a request was not proxied, and the one place that turns that into an HTTP answer.
//!
//! Every layer (routing, queue, balancer, proxy) fails with a [`ProxyError`]; only
//! [`ProxyError::into_response`] decides status codes, bodies and headers, the way
//! linkerd2-proxy maps its typed errors at the edge.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::proxy::ProxyBody;
use crate::api::FunctionKey;

/// A request the activator answers itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no Function answers at host {0:?}")]
    UnknownHost(String),
    #[error("Function {key} was deleted")]
    FunctionDeleted { key: FunctionKey },
    #[error("Function {key} is invalid: {reason}")]
    InvalidFunction { key: FunctionKey, reason: Arc<str> },
    #[error("Function {key} cannot start: {reason}")]
    StartupFailure { key: FunctionKey, reason: Arc<str> },
    #[error("Function {key} is over capacity: its queue of {capacity} requests is full")]
    QueueFull { key: FunctionKey, capacity: usize },
    #[error("Function {key} had no replica ready within {timeout:?}")]
    ActivationTimeout { key: FunctionKey, timeout: Duration },
    #[error("Function {key}: no replica reachable ({attempts} tried)")]
    Unreachable { key: FunctionKey, attempts: usize },
    #[error("Function {key}: upstream failed: {source}")]
    Upstream {
        key: FunctionKey,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Function {key} did not answer within {timeout:?}")]
    RequestTimeout { key: FunctionKey, timeout: Duration },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
}

/// Seconds a client is told to wait after an overload answer.
const RETRY_AFTER_SECS: &str = "1";

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownHost(_) | Self::FunctionDeleted { .. } => StatusCode::NOT_FOUND,
            Self::InvalidFunction { .. } | Self::StartupFailure { .. } | Self::QueueFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ActivationTimeout { .. } | Self::RequestTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Unreachable { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// Says why a request of `function` gets this answer: a warning when no replica
    /// could serve it (502), a debug event otherwise (the expected answers: unknown
    /// hosts, full queues, timeouts).
    pub(crate) fn log(&self, function: &FunctionKey) {
        if self.status() == StatusCode::BAD_GATEWAY {
            tracing::warn!(%function, error = %self, "no replica could serve the request");
        } else {
            tracing::debug!(%function, error = %self, "request answered by the activator");
        }
    }

    /// The answer the client gets.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut resp = Response::new(ProxyBody::full(Full::new(Bytes::from(format!("{self}\n")))));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            Self::QueueFull { .. } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            // The connection may hold an unread body; do not reuse it.
            Self::BodyTooLarge { .. } | Self::BadRequest(_) => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let key = FunctionKey::new("ns", "f");
        let cases = [
            (ProxyError::UnknownHost("x.example".into()), 404),
            (
                ProxyError::QueueFull {
                    key: key.clone(),
                    capacity: 1,
                },
                503,
            ),
            (
                ProxyError::ActivationTimeout {
                    key: key.clone(),
                    timeout: Duration::from_secs(1),
                },
                504,
            ),
            (
                ProxyError::Unreachable {
                    key: key.clone(),
                    attempts: 2,
                },
                502,
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, 413),
            (ProxyError::BadRequest("no host"), 400),
        ];
        for (err, code) in cases {
            assert_eq!(err.into_response().status().as_u16(), code);
        }
    }

    #[test]
    fn queue_full_says_when_to_retry() {
        let resp = ProxyError::QueueFull {
            key: FunctionKey::new("ns", "f"),
            capacity: 1,
        }
        .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
