//! Function manifests from files: reading (`-f` files and directories, multi-document
//! YAML, other kinds skipped), reporting each problem with its file, document and field,
//! and following edits by polling modification times once a second.
//!
//! Polling rather than inotify: it behaves the same on every filesystem (network mounts,
//! containers' bind mounts) and with every editor (atomic rename-over saves), and one
//! `stat` per file per second costs nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use tracing::{info, warn};

use crate::api::{Function, FunctionKey};
use crate::platform::local::{Applied, ApplyError, LocalPlatform};

/// A Function read from a file.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub function: Function,
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
}

/// A problem with one file or document; never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub document: Option<usize>,
    /// The Function concerned, when its name could be read.
    pub key: Option<FunctionKey>,
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " (document {d}")?;
            if let Some(k) = &self.key {
                write!(f, ", Function {k}")?;
            }
            write!(f, ")")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Whether a file is a manifest when found in a directory.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files named by `-f`: files as given, directories' `.yaml`/`.yml`/`.json`
/// files (not recursive, like `kubectl apply -f dir`), sorted. Missing paths are errors.
pub async fn list_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<LoadError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match tokio::fs::metadata(path).await {
            Ok(m) if m.is_dir() => match tokio::fs::read_dir(path).await {
                Ok(mut dir) => {
                    let mut found = Vec::new();
                    loop {
                        match dir.next_entry().await {
                            Ok(Some(entry)) => {
                                let p = entry.path();
                                if is_manifest(&p)
                                    && entry.file_type().await.is_ok_and(|t| !t.is_dir())
                                {
                                    found.push(p);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                errors
                                    .push(file_error(path, format!("reading the directory: {e}")));
                                break;
                            }
                        }
                    }
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(file_error(path, format!("reading the directory: {e}"))),
            },
            Ok(_) => files.push(path.clone()),
            Err(e) => errors.push(file_error(path, e.to_string())),
        }
    }
    files.dedup();
    (files, errors)
}

fn file_error(file: &Path, message: String) -> LoadError {
    LoadError {
        file: file.to_path_buf(),
        document: None,
        key: None,
        message,
    }
}

/// The outcome of parsing one file.
#[derive(Debug, Default)]
pub struct Parsed {
    pub manifests: Vec<Manifest>,
    pub errors: Vec<LoadError>,
    /// Functions whose document is present but invalid: their running version is kept.
    pub invalid: Vec<FunctionKey>,
    /// The file could not be parsed at all: everything it defined is kept as it was.
    pub unreadable: bool,
}

/// Parses the Functions of one file (multi-document YAML or JSON). Documents of other
/// kinds are skipped; a document that is not a valid Function is reported with the path
/// of the offending field.
pub fn parse(file: &Path, text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_json::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(LoadError {
                    file: file.to_path_buf(),
                    document: Some(document),
                    key: None,
                    message: format!("not valid YAML: {e}"),
                });
                out.unreadable = true;
                return out;
            }
        };
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str());
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        if kind != Some("Function") || !api_version.starts_with("zeroscale.dev/") {
            tracing::debug!(file = %file.display(), document, ?kind, "skipping a document that is not a zeroscale Function");
            continue;
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty());
        let namespace = value
            .pointer("/metadata/namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default");
        let key = name.map(|n| FunctionKey::new(namespace, n));
        let error = |message: String| LoadError {
            file: file.to_path_buf(),
            document: Some(document),
            key: key.clone(),
            message,
        };
        if api_version != "zeroscale.dev/v1alpha1" {
            out.errors.push(error(format!(
                "apiVersion {api_version} is not served; use zeroscale.dev/v1alpha1"
            )));
            out.invalid.extend(key.clone());
            continue;
        }
        if key.is_none() {
            out.errors.push(error("metadata.name: is required".into()));
            continue;
        }
        match serde_path_to_error::deserialize::<_, Function>(value) {
            Ok(function) if function.spec.undecodable.is_some() => {
                let problem = function.spec.undecodable.unwrap_or_default();
                out.errors.push(error(problem));
                out.invalid.extend(key);
            }
            Ok(function) => out.manifests.push(Manifest {
                function,
                file: file.to_path_buf(),
                document,
            }),
            Err(e) => {
                let path = e.path().to_string();
                out.errors.push(error(format!("{path}: {}", e.inner())));
                out.invalid.extend(key);
            }
        }
    }
    out
}

/// Whether two manifests define the same thing (`Function` itself has no `PartialEq`).
fn same(a: &Function, b: &Function) -> bool {
    a.spec == b.spec && a.metadata == b.metadata
}

/// The manifests of every `-f` path, applied to a [`LocalPlatform`] and kept in sync.
pub struct Watcher {
    paths: Vec<PathBuf>,
    platform: LocalPlatform,
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    /// What was applied, by Function, with the file it came from.
    applied: BTreeMap<FunctionKey, (Function, PathBuf)>,
}

impl Watcher {
    pub fn new(paths: Vec<PathBuf>, platform: LocalPlatform) -> Self {
        Self {
            paths,
            platform,
            fingerprint: Vec::new(),
            applied: BTreeMap::new(),
        }
    }

    /// The Functions applied now.
    pub fn functions(&self) -> impl Iterator<Item = &Function> {
        self.applied.values().map(|(f, _)| f)
    }

    async fn fingerprint(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        let (files, _) = list_files(&self.paths).await;
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let meta = tokio::fs::metadata(&f).await.ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            out.push((f, modified, len));
        }
        out
    }

    /// Reloads when a file was added, removed or modified since the last look.
    /// Returns the problems found (already logged).
    pub async fn poll(&mut self) -> Vec<LoadError> {
        let now = self.fingerprint().await;
        if now == self.fingerprint {
            return Vec::new();
        }
        self.fingerprint = now;
        self.reload().await
    }

    /// Reads every file and applies the differences: new and changed Functions are
    /// applied, Functions no longer defined are deleted. A file that cannot be read or
    /// parsed, and a Function whose new version is invalid, keep what runs now.
    pub async fn reload(&mut self) -> Vec<LoadError> {
        let (files, mut errors) = list_files(&self.paths).await;
        let mut wanted: BTreeMap<FunctionKey, (Function, PathBuf)> = BTreeMap::new();
        let keep = |key: &FunctionKey,
                    wanted: &mut BTreeMap<FunctionKey, (Function, PathBuf)>,
                    applied: &BTreeMap<FunctionKey, (Function, PathBuf)>| {
            if let Some(prev) = applied.get(key) {
                wanted.entry(key.clone()).or_insert_with(|| prev.clone());
            }
        };
        let mut sources: HashMap<FunctionKey, (PathBuf, usize)> = HashMap::new();
        for file in &files {
            let parsed = match tokio::fs::read_to_string(file).await {
                Ok(text) => parse(file, &text),
                Err(e) => Parsed {
                    errors: vec![file_error(file, e.to_string())],
                    unreadable: true,
                    ..Parsed::default()
                },
            };
            errors.extend(parsed.errors);
            if parsed.unreadable {
                let previous: Vec<FunctionKey> = self
                    .applied
                    .iter()
                    .filter(|(_, (_, f))| f == file)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in previous {
                    keep(&key, &mut wanted, &self.applied);
                }
            }
            for key in parsed.invalid {
                keep(&key, &mut wanted, &self.applied);
            }
            for m in parsed.manifests {
                let key = m.function.key();
                if let Some((first, doc)) = sources.get(&key) {
                    errors.push(LoadError {
                        file: m.file.clone(),
                        document: Some(m.document),
                        key: Some(key.clone()),
                        message: format!(
                            "defined again (first in {} document {doc}); this definition is ignored",
                            first.display()
                        ),
                    });
                    continue;
                }
                sources.insert(key.clone(), (m.file.clone(), m.document));
                wanted.insert(key, (m.function, m.file));
            }
        }

        // Kept versions (unreadable file, invalid document) count as still defined.
        let defined: std::collections::BTreeSet<FunctionKey> = wanted.keys().cloned().collect();
        for (key, (function, file)) in wanted {
            if self
                .applied
                .get(&key)
                .is_some_and(|(f, _)| same(f, &function))
            {
                continue;
            }
            let base = manifest_dir(&file);
            match self.platform.apply(function.clone(), &base) {
                Ok(Applied::Created) => {
                    info!(function = %key, file = %file.display(), "Function added");
                    self.applied.insert(key, (function, file));
                }
                Ok(Applied::Updated { restart }) => {
                    info!(function = %key, restart, "Function changed{}", if restart { "; replacing its replicas" } else { "" });
                    self.applied.insert(key, (function, file));
                }
                Ok(Applied::Unchanged) => {
                    self.applied.insert(key, (function, file));
                }
                Err(e @ (ApplyError::Invalid(_) | ApplyError::Unsupported(_))) => {
                    let (document, kept) = match sources.get(&key) {
                        Some((_, d)) => (Some(*d), self.applied.contains_key(&key)),
                        None => (None, false),
                    };
                    let suffix = if kept {
                        " (the previous version keeps running)"
                    } else {
                        " (skipped)"
                    };
                    errors.push(LoadError {
                        file: file.clone(),
                        document,
                        key: Some(key.clone()),
                        message: format!("{e}{suffix}"),
                    });
                }
            }
        }
        let gone: Vec<FunctionKey> = self
            .applied
            .keys()
            .filter(|k| !defined.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.platform.delete(&key);
            self.applied.remove(&key);
        }
        for e in &errors {
            warn!("{e}");
        }
        errors
    }
}

/// The folder a manifest's relative `workingDir` is resolved against: the manifest's own
/// folder, absolute (`-f hello.yaml` has an empty parent, which means the current one).
fn manifest_dir(file: &Path) -> PathBuf {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&parent).unwrap_or(parent)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bare_file_name_runs_in_the_current_folder() {
        let dir = super::manifest_dir(std::path::Path::new("hello.yaml"));
        assert_eq!(dir, std::env::current_dir().unwrap());
        let nested = super::manifest_dir(std::path::Path::new("examples/hello.yaml"));
        assert_eq!(nested, std::env::current_dir().unwrap().join("examples"));
    }

    use super::*;

    const GOOD: &str = "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {name: a}\nspec:\n  template: {spec: {containers: [{name: app, command: [x]}]}}\n";

    #[test]
    fn multi_document_files_skip_other_kinds() {
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{GOOD}---\n---\napiVersion: apps/v1\nkind: Function\nmetadata: {{name: not-ours}}\n"
        );
        let p = parse(Path::new("f.yaml"), &text);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.manifests.len(), 1);
        assert_eq!(p.manifests[0].document, 2);
        assert_eq!(
            p.manifests[0].function.key(),
            FunctionKey::new("default", "a")
        );
    }

    #[test]
    fn decode_errors_name_the_field_and_the_function() {
        let text = GOOD.replace("spec:\n", "spec:\n  scale: {min: lots}\n");
        let p = parse(Path::new("dir/f.yaml"), &text);
        assert_eq!(p.manifests.len(), 0);
        assert_eq!(p.invalid, vec![FunctionKey::new("default", "a")]);
        let msg = p.errors[0].to_string();
        assert!(
            msg.starts_with(
                "dir/f.yaml (document 1, Function default/a): spec.scale.min: invalid type"
            ),
            "{msg}"
        );
    }

    #[test]
    fn yaml_syntax_errors_and_missing_names_are_reported() {
        let p = parse(Path::new("f.yaml"), "kind: Function\n  bad: [indent\n");
        assert!(p.unreadable);
        assert!(
            p.errors[0].message.contains("not valid YAML"),
            "{:?}",
            p.errors
        );

        let text = GOOD.replace("metadata: {name: a}", "metadata: {}");
        let p = parse(Path::new("f.yaml"), &text);
        assert!(
            p.errors[0].message.contains("metadata.name"),
            "{:?}",
            p.errors
        );

        let text = GOOD.replace("v1alpha1", "v9");
        let p = parse(Path::new("f.yaml"), &text);
        assert!(p.errors[0].message.contains("not served"), "{:?}", p.errors);
    }

    #[tokio::test]
    async fn directories_list_manifest_files_and_missing_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.yml", "c.json", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let missing = dir.path().join("missing.yaml");
        let (files, errors) = list_files(&[dir.path().to_path_buf(), missing.clone()]).await;
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yml", "b.yaml", "c.json"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, missing);
    }
}

#[cfg(test)]
mod watcher_tests {
    use super::*;
    use crate::api::Defaults;
    use crate::platform::local::{LocalSettings, Output};

    fn function(name: &str, max: u32) -> String {
        format!(
            "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {{name: {name}}}\nspec:\n  template: {{spec: {{containers: [{{name: app, command: [x]}}]}}}}\n  scale: {{max: {max}}}\n"
        )
    }

    fn max_of(p: &LocalPlatform, name: &str) -> Option<i32> {
        p.function(&FunctionKey::new("default", name))
            .and_then(|f| f.spec.scale.clone())
            .and_then(|s| s.max)
    }

    #[tokio::test]
    async fn edits_apply_and_bad_edits_keep_what_runs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        std::fs::write(&a, function("a", 2)).unwrap();
        std::fs::write(&b, format!("{}---\n{}", function("b", 2), function("c", 2))).unwrap();
        let (output, _) = Output::capture();
        let p = LocalPlatform::new(LocalSettings {
            defaults: Defaults::default(),
            cluster_domain: "cluster.local".into(),
            output,
        });
        let mut w = Watcher::new(vec![dir.path().to_path_buf()], p.clone());
        assert!(w.reload().await.is_empty());
        assert_eq!(w.functions().count(), 3);

        // A valid edit is applied.
        std::fs::write(&a, function("a", 5)).unwrap();
        assert!(w.reload().await.is_empty());
        assert_eq!(max_of(&p, "a"), Some(5));

        // An invalid spec is reported with its field; the running version stays.
        std::fs::write(&a, function("a", 5).replace("max: 5", "max: 5, min: 9")).unwrap();
        let errors = w.reload().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let msg = errors[0].to_string();
        assert!(msg.contains("spec.scale.min"), "{msg}");
        assert!(msg.contains("previous version keeps running"), "{msg}");
        assert_eq!(max_of(&p, "a"), Some(5));
        std::fs::write(&a, function("a", 5)).unwrap();
        assert!(w.reload().await.is_empty());

        // A file that no longer parses keeps all of its Functions.
        std::fs::write(&b, "kind: [unclosed").unwrap();
        let errors = w.reload().await;
        assert!(errors[0].message.contains("not valid YAML"), "{errors:?}");
        assert!(max_of(&p, "b").is_some() && max_of(&p, "c").is_some());

        // Removing a document deletes its Function; removing a file deletes its own.
        std::fs::write(&b, function("b", 2)).unwrap();
        assert!(w.reload().await.is_empty());
        assert!(max_of(&p, "c").is_none(), "c was removed from b.yaml");
        std::fs::remove_file(&b).unwrap();
        w.reload().await;
        assert!(max_of(&p, "b").is_none());
        assert_eq!(max_of(&p, "a"), Some(5));

        // A Function defined twice keeps its first definition.
        std::fs::write(&b, function("a", 7)).unwrap();
        let errors = w.reload().await;
        assert!(errors[0].message.contains("defined again"), "{errors:?}");
        assert_eq!(max_of(&p, "a"), Some(5));
        p.shutdown().await;
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;
    use crate::api::Defaults;
    use crate::platform::local::{LocalSettings, Output};

    /// dev runs processes from a Function's own template; a Function that scales
    /// another object's pods is reported in one line and the others keep running.
    #[tokio::test]
    async fn a_function_with_a_scale_target_is_reported_unsupported_and_the_others_run() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/existing-deployment.yaml"
            ),
            dir.path().join("existing-deployment.yaml"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("hello.yaml"),
            "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {name: hello}\nspec:\n  template: {spec: {containers: [{name: app, command: [x]}]}}\n",
        )
        .unwrap();
        let (output, _) = Output::capture();
        let p = LocalPlatform::new(LocalSettings {
            defaults: Defaults::default(),
            cluster_domain: "cluster.local".into(),
            output,
        });
        let mut w = Watcher::new(vec![dir.path().to_path_buf()], p.clone());
        let errors = w.reload().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let line = errors[0].to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(
            line.contains("Function default/web-lazy")
                && line.contains("unsupported in dev")
                && line.contains("spec.scaleTargetRef names Deployment web"),
            "{line}"
        );
        let running: Vec<String> = w.functions().map(|f| f.key().to_string()).collect();
        assert_eq!(running, vec!["default/hello"]);
        assert!(
            p.function(&FunctionKey::new("default", "web-lazy"))
                .is_none()
        );
        p.shutdown().await;
    }
}
