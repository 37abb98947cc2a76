//! The Kubernetes platform. (Stub: the operator issue fills this in.)

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};

use super::{
    AutoscalerStatus, EndpointsEvent, FunctionEvent, Platform, PlatformError, Scale, WakeOutcome,
};
use crate::api::FunctionKey;

/// Functions, endpoints and scale through the Kubernetes API.
#[derive(Clone)]
pub struct KubePlatform {
    _client: kube::Client,
    _namespace: Option<String>,
}

impl KubePlatform {
    /// Watches Functions in `namespace` (all namespaces when `None`).
    pub fn new(client: kube::Client, namespace: Option<String>) -> Self {
        Self {
            _client: client,
            _namespace: namespace,
        }
    }
}

#[async_trait]
impl Platform for KubePlatform {
    fn functions(&self) -> BoxStream<'static, FunctionEvent> {
        stream::pending().boxed()
    }
    fn endpoints(&self) -> BoxStream<'static, EndpointsEvent> {
        stream::pending().boxed()
    }
    async fn wake(&self, key: &FunctionKey, _replicas: u32) -> Result<WakeOutcome, PlatformError> {
        Err(PlatformError::NotFound(key.clone()))
    }
    async fn scale(&self, key: &FunctionKey) -> Result<Scale, PlatformError> {
        Err(PlatformError::NotFound(key.clone()))
    }
    async fn set_scale(
        &self,
        key: &FunctionKey,
        _r: u32,
        _v: Option<&str>,
        _reason: &str,
    ) -> Result<(), PlatformError> {
        Err(PlatformError::NotFound(key.clone()))
    }
    async fn publish_autoscaler_status(
        &self,
        key: &FunctionKey,
        _s: &AutoscalerStatus,
    ) -> Result<(), PlatformError> {
        Err(PlatformError::NotFound(key.clone()))
    }
}
