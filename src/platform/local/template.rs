//! What a local replica runs, derived once per spec from a Function's pod template: the
//! command line, the environment with Kubernetes `$(VAR)` expansion, the working
//! directory, the readiness probe and the grace period. Pure code, unit-tested rule by rule.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{FunctionConfig, FunctionKey};

/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Why a template cannot run as a local process. Shown on the Function's status
/// (`Active=False`, reason `InvalidTemplate`), so a request gets it in its 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TemplateError {
    /// Path of the field, e.g. `spec.template.spec.containers[0].command`.
    pub field: String,
    pub message: String,
}

fn template_error(field: impl Into<String>, message: impl Into<String>) -> TemplateError {
    TemplateError {
        field: field.into(),
        message: message.into(),
    }
}

const CONTAINER: &str = "spec.template.spec.containers[0]";

/// Where one environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// `value:`, expanded against the variables declared before it.
    Value(String),
    /// `fieldRef: metadata.name`: the replica's name.
    PodName,
    /// `fieldRef: metadata.namespace`.
    Namespace,
    /// `fieldRef: status.podIP` / `status.hostIP`: 127.0.0.1 locally.
    LocalIp,
}

/// The port a probe checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortTarget {
    /// The Function's serving port: the replica's local port.
    Serving,
    /// Some other port, used as written.
    Fixed(u16),
}

/// What a readiness check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Tcp(PortTarget),
    Http {
        port: PortTarget,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// Runs a command with the replica's environment; exit 0 is ready.
    Exec(Vec<String>),
}

/// A readiness probe with its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub check: Check,
    pub initial_delay: Duration,
    /// `None` when the manifest does not set `periodSeconds`: the replica is probed
    /// aggressively until it is first ready (as Knative does), then every second. An
    /// explicit period is honoured as written.
    pub period: Option<Duration>,
    pub timeout: Duration,
    /// Consecutive failures that take a ready replica out of the endpoints.
    pub failure_threshold: u32,
    /// Consecutive successes that make an unready replica ready.
    pub success_threshold: u32,
}

impl ProbeSpec {
    /// The check used when the container has no readinessProbe: a TCP connect.
    pub fn default_tcp() -> Self {
        Self {
            check: Check::Tcp(PortTarget::Serving),
            initial_delay: Duration::ZERO,
            period: None,
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 1,
        }
    }
}

/// Everything needed to start replicas of one version of a Function.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaTemplate {
    pub namespace: String,
    /// `command` followed by `args`, unexpanded.
    pub argv: Vec<String>,
    pub env: Vec<(String, EnvSource)>,
    pub working_dir: PathBuf,
    /// The container port the manifest serves on; mapped to the replica's local port.
    pub container_port: u16,
    pub probe: ProbeSpec,
    pub grace: Duration,
}

/// A process ready to be spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    /// Added to (and overriding) the environment `zeroscale dev` runs in.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

impl ReplicaTemplate {
    /// Derives the local form of a Function's first container. `base_dir` (the manifest's
    /// directory) is where replicas run when the container sets no `workingDir`.
    /// Returns the template and warnings about parts that have no local meaning.
    pub fn from_config(
        key: &FunctionKey,
        config: &FunctionConfig,
        base_dir: &Path,
    ) -> Result<(Self, Vec<String>), TemplateError> {
        let mut warnings = Vec::new();
        let pod = config.template().and_then(|t| t.spec.as_ref());
        let container = pod
            .and_then(|s| s.containers.first())
            .ok_or_else(|| template_error("spec.template.spec.containers", "is empty"))?;
        let command = container.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(template_error(
                format!("{CONTAINER}.command"),
                "is not set; dev mode runs `command` + `args` as a local process and cannot \
                 know the image's entrypoint (add e.g. command: [\"python3\", \"app.py\"])",
            ));
        }
        let argv: Vec<String> = command
            .into_iter()
            .chain(container.args.clone().unwrap_or_default())
            .collect();

        let mut env = Vec::new();
        for (i, var) in container.env.iter().flatten().enumerate() {
            let field = format!("{CONTAINER}.env[{i}]");
            let source = match (&var.value, &var.value_from) {
                (_, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("metadata.name") => EnvSource::PodName,
                    Some("metadata.namespace") => EnvSource::Namespace,
                    Some("status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs") => {
                        EnvSource::LocalIp
                    }
                    _ => {
                        warnings.push(format!(
                            "{field} ({}): valueFrom has no local equivalent; left unset",
                            var.name
                        ));
                        continue;
                    }
                },
                (Some(v), None) => EnvSource::Value(v.clone()),
                (None, None) => EnvSource::Value(String::new()),
            };
            env.push((var.name.clone(), source));
        }
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            warnings.push(format!(
                "{CONTAINER}.envFrom: ConfigMaps and Secrets have no local equivalent; ignored"
            ));
        }

        let working_dir = match container.working_dir.as_deref() {
            Some(dir) if !dir.is_empty() => base_dir.join(dir),
            _ => base_dir.to_path_buf(),
        };
        let probe = match &container.readiness_probe {
            Some(p) => parse_probe(p, container, config.port, &mut warnings)?,
            None => ProbeSpec::default_tcp(),
        };
        let grace = pod
            .and_then(|s| s.termination_grace_period_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(DEFAULT_GRACE);
        Ok((
            Self {
                namespace: key.namespace.clone(),
                argv,
                env,
                working_dir,
                container_port: config.port,
                probe,
                grace,
            },
            warnings,
        ))
    }

    /// The process of one replica named `pod_name`, serving on `local_port`.
    ///
    /// The environment follows Kubernetes: each variable is expanded against those
    /// declared before it, `command`/`args` against all of them. `PORT` is always the
    /// local port (set first, so every `$(PORT)` sees it, and overriding a declared
    /// `PORT`), `HOSTNAME` defaults to the replica name, and a value or argument that
    /// names the container port (`8080`, `:8080`, `=8080`) gets the local port, so
    /// several replicas of a manifest written for a pod can share one machine.
    pub fn launch(&self, pod_name: &str, local_port: u16) -> Launch {
        let port = local_port.to_string();
        let mut vars: Vec<(String, String)> = vec![
            ("PORT".into(), port.clone()),
            ("HOSTNAME".into(), pod_name.to_string()),
        ];
        let mut index: HashMap<String, usize> = vars
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        for (name, source) in &self.env {
            let value = if name == "PORT" {
                port.clone()
            } else {
                match source {
                    EnvSource::Value(v) => {
                        let lookup = |n: &str| index.get(n).map(|&i| vars[i].1.as_str());
                        let expanded = expand(v, lookup);
                        map_port(&expanded, self.container_port, local_port).into_owned()
                    }
                    EnvSource::PodName => pod_name.to_string(),
                    EnvSource::Namespace => self.namespace.clone(),
                    EnvSource::LocalIp => "127.0.0.1".to_string(),
                }
            };
            match index.get(name) {
                Some(&i) => vars[i].1 = value,
                None => {
                    index.insert(name.clone(), vars.len());
                    vars.push((name.clone(), value));
                }
            }
        }
        let lookup = |n: &str| index.get(n).map(|&i| vars[i].1.as_str());
        let mut argv = self.argv.iter().map(|a| {
            let expanded = expand(a, lookup);
            map_port(&expanded, self.container_port, local_port).into_owned()
        });
        let program = argv.next().unwrap_or_default();
        let args = argv.collect();
        Launch {
            program,
            args,
            env: vars,
            cwd: self.working_dir.clone(),
        }
    }

    /// The probe's command, expanded like `command` (exec probes run with the
    /// container's environment).
    pub fn expand_with(&self, launch: &Launch, words: &[String]) -> Vec<String> {
        let lookup = |n: &str| {
            launch
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        words.iter().map(|w| expand(w, lookup)).collect()
    }
}

/// Kubernetes `$(VAR)` expansion (`third_party/forked/golang/expansion`): `$(NAME)` is
/// replaced by the variable's value, `$$` is an escaped `$`, and a reference to an
/// undefined variable (or an unclosed `$(`) stays as written.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            match bytes[cursor + 1] {
                b'$' => {
                    out.push('$');
                    cursor += 2;
                }
                b'(' => match input[cursor + 2..].find(')') {
                    Some(len) => {
                        let name = &input[cursor + 2..cursor + 2 + len];
                        match lookup(name) {
                            Some(v) => out.push_str(v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        cursor += 3 + len;
                    }
                    None => {
                        out.push_str("$(");
                        cursor += 2;
                    }
                },
                _ => {
                    out.push('$');
                    cursor += 1;
                }
            }
            checkpoint = cursor;
        } else {
            cursor += 1;
        }
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// Maps a value that names the container port to the local port: exactly `8080`, or
/// ending in `:8080` / `=8080` (`0.0.0.0:8080`, `--port=8080`).
pub fn map_port(value: &str, container_port: u16, local_port: u16) -> Cow<'_, str> {
    let cp = container_port.to_string();
    if value == cp {
        return Cow::Owned(local_port.to_string());
    }
    if let Some(prefix) = value.strip_suffix(cp.as_str())
        && (prefix.ends_with(':') || prefix.ends_with('='))
    {
        return Cow::Owned(format!("{prefix}{local_port}"));
    }
    Cow::Borrowed(value)
}

fn parse_probe(
    probe: &Probe,
    container: &Container,
    serving_port: u16,
    warnings: &mut Vec<String>,
) -> Result<ProbeSpec, TemplateError> {
    let field = format!("{CONTAINER}.readinessProbe");
    let port = |p: &IntOrString, f: &str| resolve_port(p, container, serving_port, f);
    let check = if let Some(http) = &probe.http_get {
        let port = port(&http.port, &format!("{field}.httpGet.port"))?;
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            warnings.push(format!(
                "{field}.httpGet.scheme: HTTPS probes are checked with a TCP connect locally"
            ));
            Check::Tcp(port)
        } else {
            let mut path = http.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            let headers = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            Check::Http {
                port,
                path,
                headers,
            }
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        Check::Tcp(port(&tcp.port, &format!("{field}.tcpSocket.port"))?)
    } else if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(template_error(
                format!("{field}.exec.command"),
                "must not be empty",
            ));
        }
        Check::Exec(command)
    } else if probe.grpc.is_some() {
        warnings.push(format!(
            "{field}.grpc: gRPC probes are checked with a TCP connect locally"
        ));
        Check::Tcp(PortTarget::Serving)
    } else {
        return Err(template_error(
            field,
            "must set one of httpGet, tcpSocket, exec or grpc",
        ));
    };
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Ok(ProbeSpec {
        check,
        initial_delay: secs(probe.initial_delay_seconds, 0),
        period: probe
            .period_seconds
            .filter(|p| *p > 0)
            .map(|p| Duration::from_secs(p as u64)),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
    })
}

fn resolve_port(
    port: &IntOrString,
    container: &Container,
    serving_port: u16,
    field: &str,
) -> Result<PortTarget, TemplateError> {
    let number = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => match s.parse::<i32>() {
            Ok(n) => n,
            Err(_) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    template_error(
                        field,
                        format!("names port {s:?}, which the container does not declare"),
                    )
                })?,
        },
    };
    let number = u16::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            template_error(field, format!("must be between 1 and 65535, got {number}"))
        })?;
    Ok(if number == serving_port {
        PortTarget::Serving
    } else {
        PortTarget::Fixed(number)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Defaults, Function};

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env = [("PORT", "4000"), ("HOST", "0.0.0.0")];
        let cases = [
            ("$(PORT)", "4000"),
            ("$(HOST):$(PORT)", "0.0.0.0:4000"),
            ("--port=$(PORT)", "--port=4000"),
            // `$$` escapes, so `$$(PORT)` is the literal `$(PORT)`.
            ("$$(PORT)", "$(PORT)"),
            ("$$$(PORT)", "$4000"),
            ("cost: $$5", "cost: $5"),
            // Undefined references stay literal, as Kubernetes leaves them.
            ("$(NOPE)", "$(NOPE)"),
            ("a$(NOPE)b$(PORT)", "a$(NOPE)b4000"),
            // Incomplete references and lone operators are kept.
            ("$(PORT", "$(PORT"),
            ("$", "$"),
            ("a$b", "a$b"),
            ("100$", "100$"),
            ("$()", "$()"),
            ("ünïcødé $(PORT) ✓", "ünïcødé 4000 ✓"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, vars(&env)), want, "expanding {input:?}");
        }
    }

    #[test]
    fn container_port_maps_to_the_local_port() {
        assert_eq!(map_port("8080", 8080, 41000), "41000");
        assert_eq!(map_port("0.0.0.0:8080", 8080, 41000), "0.0.0.0:41000");
        assert_eq!(map_port("--port=8080", 8080, 41000), "--port=41000");
        assert_eq!(map_port("18080", 8080, 41000), "18080");
        assert_eq!(map_port("8080x", 8080, 41000), "8080x");
        assert_eq!(map_port("http://x:8080/a", 8080, 41000), "http://x:8080/a");
    }

    fn template(yaml_container: &str) -> Result<(ReplicaTemplate, Vec<String>), TemplateError> {
        let text = format!(
            "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {{name: f, namespace: ns}}\nspec:\n  template:\n    spec:\n      containers:\n      - {yaml_container}\n"
        );
        let f: Function = serde_yaml::from_str(&text).unwrap();
        let config = FunctionConfig::resolve(&f.spec, &Defaults::default()).unwrap();
        ReplicaTemplate::from_config(&f.key(), &config, Path::new("/srv/fns"))
    }

    #[test]
    fn command_env_and_port_are_built_for_a_replica() {
        let (t, warnings) = template(
            r#"{name: app, command: [python3, -m, http.server, "$(PORT)"], args: ["--bind", "$(BIND)", "8080"],
               ports: [{containerPort: 8080}],
               env: [{name: PORT, value: "8080"}, {name: BIND, value: "127.0.0.1"},
                     {name: URL, value: "http://$(BIND):$(PORT)/"}, {name: LISTEN, value: "0.0.0.0:8080"},
                     {name: LATER, value: "$(DEFINED_AFTER)"}, {name: DEFINED_AFTER, value: "x"},
                     {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}},
                     {name: SECRET, valueFrom: {secretKeyRef: {name: s, key: k}}}]}"#,
        )
        .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("env[7]"), "{warnings:?}");
        let l = t.launch("f-3", 41234);
        assert_eq!(l.program, "python3");
        assert_eq!(
            l.args,
            ["-m", "http.server", "41234", "--bind", "127.0.0.1", "41234"]
        );
        let env: HashMap<_, _> = l.env.iter().cloned().collect();
        assert_eq!(
            env["PORT"], "41234",
            "PORT is the local port, not the manifest's"
        );
        assert_eq!(env["URL"], "http://127.0.0.1:41234/");
        assert_eq!(env["LISTEN"], "0.0.0.0:41234");
        assert_eq!(
            env["LATER"], "$(DEFINED_AFTER)",
            "only variables declared earlier expand, as in Kubernetes"
        );
        assert_eq!(env["POD"], "f-3");
        assert_eq!(env["HOSTNAME"], "f-3");
        assert!(!env.contains_key("SECRET"));
        assert_eq!(l.cwd, Path::new("/srv/fns"));
    }

    #[test]
    fn port_is_set_even_when_the_manifest_does_not_declare_it() {
        let (t, _) =
            template(r#"{name: app, command: [sh, -c, "exec serve --port $(PORT)"]}"#).unwrap();
        let l = t.launch("f-0", 5000);
        assert_eq!(l.args, ["-c", "exec serve --port 5000"]);
        assert_eq!(t.container_port, 8080);
    }

    #[test]
    fn working_dir_is_relative_to_the_manifest() {
        let (t, _) = template("{name: app, command: [x], workingDir: sub}").unwrap();
        assert_eq!(t.working_dir, Path::new("/srv/fns/sub"));
        let (t, _) = template("{name: app, command: [x], workingDir: /abs}").unwrap();
        assert_eq!(t.working_dir, Path::new("/abs"));
    }

    #[test]
    fn args_without_command_cannot_run_locally() {
        let err = template("{name: app, image: nginx, args: [--flag]}").unwrap_err();
        assert_eq!(err.field, "spec.template.spec.containers[0].command");
        assert!(err.message.contains("entrypoint"), "{err}");
    }

    #[test]
    fn probes_are_parsed_with_their_timing() {
        let (t, _) = template("{name: app, command: [x]}").unwrap();
        assert_eq!(t.probe, ProbeSpec::default_tcp());

        let (t, _) = template(
            r#"{name: app, command: [x], ports: [{containerPort: 9000, name: http}],
               readinessProbe: {httpGet: {path: healthz, port: http, httpHeaders: [{name: X-A, value: b}]},
                                initialDelaySeconds: 2, periodSeconds: 5, failureThreshold: 4, timeoutSeconds: 3}}"#,
        )
        .unwrap();
        assert_eq!(
            t.probe,
            ProbeSpec {
                check: Check::Http {
                    port: PortTarget::Serving,
                    path: "/healthz".into(),
                    headers: vec![("X-A".into(), "b".into())],
                },
                initial_delay: Duration::from_secs(2),
                period: Some(Duration::from_secs(5)),
                timeout: Duration::from_secs(3),
                failure_threshold: 4,
                success_threshold: 1,
            }
        );

        let (t, _) =
            template("{name: app, command: [x], readinessProbe: {tcpSocket: {port: 9100}}}")
                .unwrap();
        assert_eq!(t.probe.check, Check::Tcp(PortTarget::Fixed(9100)));
        assert_eq!(t.probe.period, None);

        let (t, _) = template(
            "{name: app, command: [x], readinessProbe: {exec: {command: [test, -f, /tmp/ready]}, periodSeconds: 1}}",
        )
        .unwrap();
        assert_eq!(
            t.probe.check,
            Check::Exec(vec!["test".into(), "-f".into(), "/tmp/ready".into()])
        );

        let (t, w) = template(
            "{name: app, command: [x], readinessProbe: {httpGet: {port: 8080, scheme: HTTPS}}}",
        )
        .unwrap();
        assert_eq!(t.probe.check, Check::Tcp(PortTarget::Serving));
        assert!(w[0].contains("HTTPS"), "{w:?}");
    }

    #[test]
    fn bad_probes_name_the_field() {
        let err = template("{name: app, command: [x], readinessProbe: {httpGet: {port: admin}}}")
            .unwrap_err();
        assert_eq!(
            err.field,
            "spec.template.spec.containers[0].readinessProbe.httpGet.port"
        );
        let err =
            template("{name: app, command: [x], readinessProbe: {periodSeconds: 1}}").unwrap_err();
        assert_eq!(err.field, "spec.template.spec.containers[0].readinessProbe");
        let err = template("{name: app, command: [x], readinessProbe: {exec: {command: []}}}")
            .unwrap_err();
        assert!(err.field.ends_with("exec.command"), "{err}");
    }

    #[test]
    fn grace_period_defaults_to_thirty_seconds() {
        let (t, _) = template("{name: app, command: [x]}").unwrap();
        assert_eq!(t.grace, Duration::from_secs(30));
    }
}
