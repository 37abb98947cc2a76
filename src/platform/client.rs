//! The Kubernetes client of the operator and the activator: kube's default stack with a
//! layer that counts every API request by verb, resource and response code, as
//! `zeroscale_<component>_api_requests_total{verb,resource,code}` on the component's
//! `/metrics`. What zeroscale costs the API server per Function (while settling, and in a
//! steady state, where it should be nothing) is then visible to users and measured by
//! `make bench-cluster`, without access to the API server's own metrics.
//!
//! The verbs are the API server's (`get`, `list`, `watch`, `create`, `update`, `patch`,
//! `delete`, `deletecollection`); the resource is the plural with its subresource
//! (`deployments/scale`, `functions/status`); the code is the HTTP status, or `error`
//! when no response came.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Request, Response, Uri};
use prometheus::{IntCounterVec, Opts, Registry};
use tower::{Layer, Service};

/// The request counter of one component.
#[derive(Clone)]
pub struct ApiRequests {
    counter: IntCounterVec,
}

impl ApiRequests {
    /// Registers `zeroscale_<component>_api_requests_total` in `registry`.
    pub fn register(registry: &Registry, component: &str) -> Result<Self, prometheus::Error> {
        let counter = IntCounterVec::new(
            Opts::new(
                format!("zeroscale_{component}_api_requests_total"),
                "Requests to the Kubernetes API server, by verb, resource and response code.",
            ),
            &["verb", "resource", "code"],
        )?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Self { counter })
    }

    /// How many requests were counted with these labels (tests).
    pub fn get(&self, verb: &str, resource: &str, code: &str) -> u64 {
        self.counter
            .with_label_values(&[verb, resource, code])
            .get()
    }
}

impl<S> Layer<S> for ApiRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            counter: self.counter.clone(),
        }
    }
}

/// A service that counts the requests it passes on.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    counter: IntCounterVec,
}

impl<S, B, R> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (verb, resource) = classify(request.method(), request.uri());
        CountedFuture {
            inner: self.inner.call(request),
            labels: Some((verb, resource, self.counter.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Counted`]: counts once the response head (or an error)
    /// is there.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        labels: Option<(&'static str, String, IntCounterVec)>,
    }
}

impl<F, R, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some((verb, resource, counter)) = this.labels.take() {
            let code = match &out {
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            counter.with_label_values(&[verb, &resource, &code]).inc();
        }
        Poll::Ready(out)
    }
}

/// The API server's verb and the resource (`plural` or `plural/subresource`) of a request.
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    // namespaces/<ns>/<resource>... (but /api/v1/namespaces/<name> is a namespace itself)
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => (uri.path().to_string(), false),
        [plural] => (plural.to_string(), false),
        [plural, _name] => (plural.to_string(), true),
        [plural, _name, sub, ..] => (format!("{plural}/{sub}"), true),
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// A client from the environment (in-cluster or `KUBECONFIG`) whose requests are counted
/// in `registry` under `component`.
pub async fn client(registry: &Registry, component: &str) -> crate::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| crate::Error::Config(format!("no Kubernetes client configuration: {e}")))?;
    let counter = ApiRequests::register(registry, component)
        .map_err(|e| crate::Error::Config(format!("registering the API request counter: {e}")))?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&counter)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb_resource(method: Method, uri: &str) -> (&'static str, String) {
        classify(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let cases = [
            (
                Method::GET,
                "/apis/apps/v1/namespaces/a/deployments/f",
                "get",
                "deployments",
            ),
            (
                Method::GET,
                "/apis/apps/v1/deployments?labelSelector=x",
                "list",
                "deployments",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/a/deployments?watch=true&resourceVersion=5",
                "watch",
                "deployments",
            ),
            (
                Method::PUT,
                "/apis/apps/v1/namespaces/a/deployments/f/scale",
                "update",
                "deployments/scale",
            ),
            (
                Method::PATCH,
                "/apis/zeroscale.dev/v1alpha1/namespaces/a/functions/f/status?fieldManager=m",
                "patch",
                "functions/status",
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/a/events",
                "create",
                "events",
            ),
            (Method::GET, "/api/v1/namespaces/a", "get", "namespaces"),
            (Method::GET, "/api/v1/namespaces", "list", "namespaces"),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/pods/p",
                "delete",
                "pods",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/pods",
                "deletecollection",
                "pods",
            ),
            (Method::GET, "/version", "list", "/version"),
        ];
        for (method, uri, verb, resource) in cases {
            assert_eq!(
                verb_resource(method, uri),
                (verb, resource.to_string()),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn every_request_through_the_client_is_counted_with_its_code() {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<kube::client::Body>>();
        let registry = Registry::new();
        let counter = ApiRequests::register(&registry, "test").unwrap();
        let client = kube::client::ClientBuilder::new(service, "default")
            .with_layer(&counter)
            .build();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let code = if request.uri().path().ends_with("/missing") {
                    404
                } else {
                    200
                };
                let body = if code == 404 {
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "not found", "reason": "NotFound",
                        "code": 404})
                } else {
                    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "present", "namespace": "default"}})
                };
                send.send_response(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            }
        });
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client, "default");
        api.get("present").await.unwrap();
        api.get("present").await.unwrap();
        assert!(api.get_opt("missing").await.unwrap().is_none());
        assert_eq!(counter.get("get", "configmaps", "200"), 2);
        assert_eq!(counter.get("get", "configmaps", "404"), 1);
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(
            "zeroscale_test_api_requests_total{code=\"200\",resource=\"configmaps\",verb=\"get\"} 2"
        ));
    }
}
