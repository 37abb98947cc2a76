//! A pod's volumes, made as the kubelet makes them but as plain directories under the
//! pod's state directory, which the sandbox bind-mounts into each container: `emptyDir`,
//! `configMap`, `secret`, `downwardAPI`, `projected` (ServiceAccount token from the
//! TokenRequest API, ConfigMap, Secret, downward API) and `hostPath` (an existing host
//! path, never created). [`plan`] decides the files (pure); the rest writes them and keeps
//! tokens fresh.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Component, Path, PathBuf};

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::env::{PodFacts, Sources, field_ref, resource_value};

/// Where the kubelet mounts the ServiceAccount credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The volume the stand-in adds when the API server's ServiceAccount admission did not.
pub const AUTO_TOKEN_VOLUME: &str = "kube-api-access-standin";
/// The default file mode of projected/ConfigMap/Secret volumes (0644).
const DEFAULT_MODE: u32 = 0o644;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// Something the volume needs does not exist (yet): retried, like a kubelet mount.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

/// One file of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// A ServiceAccount token file of a projected volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub volume: String,
    pub path: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// An empty directory, kept while the pod lives.
    Empty,
    /// Files the stand-in writes (and tokens it requests).
    Files {
        files: Vec<VolumeFile>,
        tokens: Vec<TokenFile>,
    },
    /// An existing host path.
    Host(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedVolume {
    pub name: String,
    pub kind: VolumeKind,
}

/// The names of the ConfigMaps and Secrets the pod refers to (volumes and environment).
pub fn references(pod: &Pod, auto_token: bool) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut cms, mut secrets) = (BTreeSet::new(), BTreeSet::new());
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for from in c.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &from.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
        for var in c.env.iter().flatten() {
            if let Some(from) = &var.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            cms.insert(cm.name.clone());
        }
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(name);
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &p.config_map {
                cms.insert(cm.name.clone());
            }
            if let Some(s) = &p.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    if auto_token {
        cms.insert("kube-root-ca.crt".into());
    }
    (cms, secrets)
}

/// Whether the stand-in must add the ServiceAccount volume itself: automounting is not
/// turned off and no container already mounts something at the ServiceAccount path.
pub fn needs_auto_token(pod: &Pod, service_account: Option<&ServiceAccount>) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    let automount = spec
        .automount_service_account_token
        .or_else(|| service_account.and_then(|sa| sa.automount_service_account_token))
        .unwrap_or(true);
    let mounted = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.mount_path.trim_end_matches('/') == SERVICE_ACCOUNT_DIR);
    automount && !mounted
}

fn mode(m: Option<i32>, default: u32) -> u32 {
    m.and_then(|m| u32::try_from(m).ok())
        .map(|m| m & 0o777)
        .unwrap_or(default)
}

/// A relative path inside a volume, without `..` or absolute parts.
fn check_path(path: &str) -> Result<(), VolumeError> {
    let p = Path::new(path);
    if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(VolumeError::Invalid(format!("invalid path {path:?}")));
    }
    Ok(())
}

/// Key/value data as files: every key, or the listed `items`.
fn key_files(
    what: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    default_mode: u32,
) -> Result<Vec<VolumeFile>, VolumeError> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(k, v)| VolumeFile {
                path: k,
                data: v,
                mode: default_mode,
            })
            .collect()),
        Some(items) => {
            let mut files = Vec::new();
            for item in items {
                check_path(&item.path)?;
                match data.get(&item.key) {
                    Some(v) => files.push(VolumeFile {
                        path: item.path.clone(),
                        data: v.clone(),
                        mode: mode(item.mode, default_mode),
                    }),
                    None if optional => {}
                    None => {
                        return Err(VolumeError::Invalid(if what == "secret" {
                            format!("references non-existent secret key: {}", item.key)
                        } else {
                            format!("configmap references non-existent config key: {}", item.key)
                        }));
                    }
                }
            }
            Ok(files)
        }
    }
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    data
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

fn config_map_files(
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    default_mode: u32,
    sources: &Sources,
) -> Result<Vec<VolumeFile>, VolumeError> {
    match sources.config_maps.get(name) {
        Some(cm) => key_files(
            "configmap",
            config_map_data(cm),
            items,
            optional,
            default_mode,
        ),
        None if optional => Ok(Vec::new()),
        None => Err(VolumeError::Missing(format!(
            "configmap \"{name}\" not found"
        ))),
    }
}

fn secret_files(
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    default_mode: u32,
    sources: &Sources,
) -> Result<Vec<VolumeFile>, VolumeError> {
    match sources.secrets.get(name) {
        Some(s) => key_files("secret", secret_data(s), items, optional, default_mode),
        None if optional => Ok(Vec::new()),
        None => Err(VolumeError::Missing(format!("secret \"{name}\" not found"))),
    }
}

fn downward_files(
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    facts: &PodFacts,
) -> Result<Vec<VolumeFile>, VolumeError> {
    let mut files = Vec::new();
    for item in items {
        check_path(&item.path)?;
        let value = if let Some(f) = &item.field_ref {
            field_ref(f, facts).map_err(|e| VolumeError::Invalid(e.0))?
        } else if let Some(r) = &item.resource_field_ref {
            resource_value(r, facts.pod, None, facts).map_err(|e| VolumeError::Invalid(e.0))?
        } else {
            String::new()
        };
        files.push(VolumeFile {
            path: item.path.clone(),
            data: value.into_bytes(),
            mode: mode(item.mode, default_mode),
        });
    }
    Ok(files)
}

/// The pod's volumes (plus the ServiceAccount volume when `auto_token`).
pub fn plan(
    facts: &PodFacts,
    sources: &Sources,
    auto_token: bool,
) -> Result<Vec<PlannedVolume>, VolumeError> {
    let pod = facts.pod;
    let mut out = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let kind = if v.empty_dir.is_some() {
            VolumeKind::Empty
        } else if let Some(h) = &v.host_path {
            VolumeKind::Host(PathBuf::from(&h.path))
        } else if let Some(cm) = &v.config_map {
            let files = config_map_files(
                &cm.name,
                cm.items.as_ref(),
                cm.optional == Some(true),
                mode(cm.default_mode, DEFAULT_MODE),
                sources,
            )?;
            VolumeKind::Files {
                files,
                tokens: vec![],
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let files = secret_files(
                &name,
                s.items.as_ref(),
                s.optional == Some(true),
                mode(s.default_mode, DEFAULT_MODE),
                sources,
            )?;
            VolumeKind::Files {
                files,
                tokens: vec![],
            }
        } else if let Some(d) = &v.downward_api {
            let files = downward_files(
                d.items.as_deref().unwrap_or_default(),
                mode(d.default_mode, DEFAULT_MODE),
                facts,
            )?;
            VolumeKind::Files {
                files,
                tokens: vec![],
            }
        } else if let Some(p) = &v.projected {
            let default_mode = mode(p.default_mode, DEFAULT_MODE);
            let (mut files, mut tokens) = (Vec::new(), Vec::new());
            for source in p.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    files.extend(config_map_files(
                        &cm.name,
                        cm.items.as_ref(),
                        cm.optional == Some(true),
                        default_mode,
                        sources,
                    )?);
                } else if let Some(s) = &source.secret {
                    files.extend(secret_files(
                        &s.name,
                        s.items.as_ref(),
                        s.optional == Some(true),
                        default_mode,
                        sources,
                    )?);
                } else if let Some(d) = &source.downward_api {
                    files.extend(downward_files(
                        d.items.as_deref().unwrap_or_default(),
                        default_mode,
                        facts,
                    )?);
                } else if let Some(t) = &source.service_account_token {
                    check_path(&t.path)?;
                    tokens.push(TokenFile {
                        volume: v.name.clone(),
                        path: t.path.clone(),
                        audience: t.audience.clone().filter(|a| !a.is_empty()),
                        expiration_seconds: t.expiration_seconds.unwrap_or(3600).max(600),
                        mode: default_mode,
                    });
                } else {
                    return Err(VolumeError::Invalid(format!(
                        "volume {}: unsupported projection",
                        v.name
                    )));
                }
            }
            VolumeKind::Files { files, tokens }
        } else {
            return Err(VolumeError::Invalid(format!(
                "volume {}: unsupported volume type on the stand-in node",
                v.name
            )));
        };
        out.push(PlannedVolume {
            name: v.name.clone(),
            kind,
        });
    }
    if auto_token {
        let mut files = config_map_files(
            "kube-root-ca.crt",
            Some(&vec![KeyToPath {
                key: "ca.crt".into(),
                path: "ca.crt".into(),
                mode: None,
            }]),
            false,
            DEFAULT_MODE,
            sources,
        )?;
        files.push(VolumeFile {
            path: "namespace".into(),
            data: pod.namespace().unwrap_or_default().into_bytes(),
            mode: DEFAULT_MODE,
        });
        out.push(PlannedVolume {
            name: AUTO_TOKEN_VOLUME.into(),
            kind: VolumeKind::Files {
                files,
                tokens: vec![TokenFile {
                    volume: AUTO_TOKEN_VOLUME.into(),
                    path: "token".into(),
                    audience: None,
                    expiration_seconds: 3600,
                    mode: DEFAULT_MODE,
                }],
            },
        });
    }
    Ok(out)
}

/// Fetches the ConfigMaps and Secrets named; names that do not exist are left out.
pub async fn fetch_sources(
    client: &Client,
    namespace: &str,
    config_maps: &BTreeSet<String>,
    secrets: &BTreeSet<String>,
) -> Result<Sources, kube::Error> {
    let mut sources = Sources::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for name in config_maps {
        if let Some(cm) = cm_api.get_opt(name).await? {
            sources.config_maps.insert(name.clone(), cm);
        }
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in secrets {
        if let Some(s) = secret_api.get_opt(name).await? {
            sources.secrets.insert(name.clone(), s);
        }
    }
    Ok(sources)
}

/// The directory of one volume under the pod's volume directory.
pub fn volume_dir(volumes: &Path, name: &str) -> PathBuf {
    volumes.join(name)
}

/// Writes the volumes' directories and files. With `fs_group`, files and directories
/// belong to that group and are group-readable (emptyDirs group-writable), as the kubelet
/// does for volumes that support ownership management.
pub fn write(
    volumes: &Path,
    planned: &[PlannedVolume],
    fs_group: Option<u32>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(volumes)?;
    for v in planned {
        let dir = volume_dir(volumes, &v.name);
        match &v.kind {
            VolumeKind::Host(_) => {}
            VolumeKind::Empty => {
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                if let Some(g) = fs_group {
                    chown(&dir, None, Some(g))?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2777))?;
                }
            }
            VolumeKind::Files { files, .. } => {
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
                if let Some(g) = fs_group {
                    chown(&dir, None, Some(g))?;
                }
                for f in files {
                    write_file(&dir, &f.path, &f.data, f.mode, fs_group)?;
                }
            }
        }
    }
    Ok(())
}

/// Writes one file atomically (a rename), so a container never reads half a token.
pub fn write_file(
    dir: &Path,
    path: &str,
    data: &[u8],
    mode: u32,
    fs_group: Option<u32>,
) -> std::io::Result<()> {
    let target = dir.join(path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = target.with_file_name(format!(
        ".{}.tmp",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, data)?;
    let mode = if fs_group.is_some() {
        mode | 0o040
    } else {
        mode
    };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = fs_group {
        chown(&tmp, None, Some(g))?;
    }
    std::fs::rename(&tmp, &target)
}

/// Writes a token file off the async runtime.
pub async fn write_token(
    dir: PathBuf,
    file: &TokenFile,
    token: String,
    fs_group: Option<u32>,
) -> std::io::Result<()> {
    let (path, mode) = (file.path.clone(), file.mode);
    tokio::task::spawn_blocking(move || write_file(&dir, &path, token.as_bytes(), mode, fs_group))
        .await
        .map_err(std::io::Error::other)?
}

/// A token for the pod's ServiceAccount, bound to the pod. Returns the token and when it
/// expires.
pub async fn request_token(
    client: &Client,
    pod: &Pod,
    file: &TokenFile,
) -> Result<(String, Timestamp), kube::Error> {
    let namespace = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: file.audience.clone().into_iter().collect(),
            expiration_seconds: Some(file.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        },
        ..Default::default()
    };
    let answer = api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await?;
    match answer.status {
        Some(status) => Ok((status.token, status.expiration_timestamp.0)),
        None => Err(kube::Error::Service(
            "the TokenRequest answer has no status".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "x",
                "volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
                "volumes": volumes}
        }))
        .unwrap()
    }

    fn facts(pod: &Pod) -> PodFacts<'_> {
        PodFacts {
            pod,
            pod_ips: &[],
            host_ip: "10.244.0.1",
            node_cpu_millis: 1000.0,
            node_memory_bytes: 1e9,
        }
    }

    fn sources() -> Sources {
        let mut s = Sources::default();
        s.config_maps.insert(
            "cfg".into(),
            serde_json::from_value(json!({"metadata": {"name": "cfg"},
                "data": {"a.yaml": "x: 1", "b": "2"}, "binaryData": {"bin": "AAE="}}))
            .unwrap(),
        );
        s.config_maps.insert(
            "kube-root-ca.crt".into(),
            serde_json::from_value(json!({"metadata": {"name": "kube-root-ca.crt"},
                "data": {"ca.crt": "PEM"}}))
            .unwrap(),
        );
        s.secrets.insert(
            "sec".into(),
            serde_json::from_value(json!({"metadata": {"name": "sec"}, "data": {"k": "dg=="}}))
                .unwrap(),
        );
        s
    }

    fn files(v: &PlannedVolume) -> Vec<(String, Vec<u8>, u32)> {
        match &v.kind {
            VolumeKind::Files { files, .. } => files
                .iter()
                .map(|f| (f.path.clone(), f.data.clone(), f.mode))
                .collect(),
            other => panic!("not files: {other:?}"),
        }
    }

    #[test]
    fn config_map_volumes_take_every_key_or_the_items() {
        let p = pod(json!([{"name": "v", "configMap": {"name": "cfg"}}]));
        let planned = plan(&facts(&p), &sources(), false).unwrap();
        assert_eq!(
            files(&planned[0]),
            vec![
                ("a.yaml".into(), b"x: 1".to_vec(), 0o644),
                ("b".into(), b"2".to_vec(), 0o644),
                ("bin".into(), vec![0, 1], 0o644),
            ]
        );
        let p = pod(
            json!([{"name": "v", "configMap": {"name": "cfg", "defaultMode": 0o400,
            "items": [{"key": "b", "path": "sub/b.txt"}, {"key": "a.yaml", "path": "a", "mode": 0o600}]}}]),
        );
        let planned = plan(&facts(&p), &sources(), false).unwrap();
        assert_eq!(
            files(&planned[0]),
            vec![
                ("sub/b.txt".into(), b"2".to_vec(), 0o400),
                ("a".into(), b"x: 1".to_vec(), 0o600),
            ]
        );
    }

    #[test]
    fn missing_sources_wait_unless_optional() {
        let p = pod(json!([{"name": "v", "configMap": {"name": "later"}}]));
        assert_eq!(
            plan(&facts(&p), &sources(), false).unwrap_err(),
            VolumeError::Missing("configmap \"later\" not found".into())
        );
        let p = pod(json!([{"name": "v", "secret": {"secretName": "later", "optional": true}}]));
        assert_eq!(
            files(&plan(&facts(&p), &sources(), false).unwrap()[0]),
            vec![]
        );
        let p = pod(
            json!([{"name": "v", "configMap": {"name": "cfg", "items": [{"key": "zz", "path": "zz"}]}}]),
        );
        assert!(matches!(
            plan(&facts(&p), &sources(), false),
            Err(VolumeError::Invalid(_))
        ));
    }

    #[test]
    fn projected_service_account_volume() {
        let p = pod(
            json!([{"name": "kube-api-access-x", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}]),
        );
        let planned = plan(&facts(&p), &sources(), false).unwrap();
        assert_eq!(
            files(&planned[0]),
            vec![
                ("ca.crt".into(), b"PEM".to_vec(), 0o644),
                ("namespace".into(), b"ns".to_vec(), 0o644),
            ]
        );
        let VolumeKind::Files { tokens, .. } = &planned[0].kind else {
            panic!()
        };
        assert_eq!(tokens[0].path, "token");
        assert_eq!(tokens[0].expiration_seconds, 3607);
        assert_eq!(tokens[0].audience, None);
    }

    #[test]
    fn the_stand_in_adds_the_service_account_volume_only_when_needed() {
        let p = pod(json!([]));
        assert!(needs_auto_token(&p, None));
        let sa: ServiceAccount = serde_json::from_value(
            json!({"metadata": {"name": "default"}, "automountServiceAccountToken": false}),
        )
        .unwrap();
        assert!(!needs_auto_token(&p, Some(&sa)));
        let mounted: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "volumeMounts": [{"name": "t", "mountPath": SERVICE_ACCOUNT_DIR}]}]}}))
            .unwrap();
        assert!(!needs_auto_token(&mounted, None));
        let planned = plan(&facts(&p), &sources(), true).unwrap();
        assert_eq!(planned[0].name, AUTO_TOKEN_VOLUME);
        assert_eq!(
            files(&planned[0]),
            vec![
                ("ca.crt".into(), b"PEM".to_vec(), 0o644),
                ("namespace".into(), b"ns".to_vec(), 0o644),
            ]
        );
        let (cms, _) = references(&p, true);
        assert!(cms.contains("kube-root-ca.crt"));
    }

    #[test]
    fn downward_api_and_paths() {
        let p = pod(json!([{"name": "v", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o600}]}}]));
        let planned = plan(&facts(&p), &sources(), false).unwrap();
        assert_eq!(
            files(&planned[0]),
            vec![
                ("labels".into(), b"a=\"b\"".to_vec(), 0o644),
                ("name".into(), b"p".to_vec(), 0o600),
            ]
        );
        let p = pod(json!([{"name": "v", "downwardAPI": {"items": [
            {"path": "../escape", "fieldRef": {"fieldPath": "metadata.name"}}]}}]));
        assert!(plan(&facts(&p), &sources(), false).is_err());
    }

    #[test]
    fn files_are_written_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let planned = vec![
            PlannedVolume {
                name: "cfg".into(),
                kind: VolumeKind::Files {
                    files: vec![VolumeFile {
                        path: "sub/x".into(),
                        data: b"hello".to_vec(),
                        mode: 0o600,
                    }],
                    tokens: vec![],
                },
            },
            PlannedVolume {
                name: "scratch".into(),
                kind: VolumeKind::Empty,
            },
        ];
        write(dir.path(), &planned, None).unwrap();
        let x = dir.path().join("cfg/sub/x");
        assert_eq!(std::fs::read(&x).unwrap(), b"hello");
        assert_eq!(
            std::fs::metadata(&x).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("scratch"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o777
        );
    }
}
