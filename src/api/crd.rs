//! The CustomResourceDefinition of `Function`, as `zeroscale crd` prints it.
//!
//! The pod template's schema is trimmed on purpose: the full core/v1 PodTemplateSpec
//! schema is several hundred KiB, which would break a plain client-side
//! `kubectl apply -f crds/` (the last-applied annotation caps objects at 256 KiB). The
//! schema checks the parts zeroscale relies on (containers with names, images, ports) and
//! preserves the rest, which the API server checks when the Deployment is created.
//!
//! The CRD must install on the oldest Kubernetes zeroscale supports ([`OLDEST_KUBERNETES`]),
//! whose API server decodes it strictly: a field that version does not know is refused,
//! not ignored. So the CEL rules carry only `rule` and `message` (`messageExpression` is
//! 1.27+, `reason` and `fieldPath` 1.28+), and each message names its field itself. Before
//! 1.25, CEL is behind a feature gate; where it is off the API server drops the rules and
//! the operator's runtime validation refuses the same things on the Function's status.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::{Schema, SchemaGenerator, json_schema};

use super::Function;

/// The oldest Kubernetes minor version zeroscale supports (and the e2e suite runs on).
pub const OLDEST_KUBERNETES: &str = "1.24";
/// The newest Kubernetes minor version zeroscale has been proven on.
pub const NEWEST_KUBERNETES: &str = "1.36";

/// The schema of `spec.template`.
pub fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "The pod template each replica runs (core/v1 PodTemplateSpec). The first container serves HTTP on `port`. Fields not described here are preserved and checked by the API server when the Deployment is created.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "description": "Labels and annotations for the pods.",
                "type": "object",
                "properties": {
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
                },
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "description": "The pod spec (core/v1 PodSpec).",
                "type": "object",
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "description": "The pod's containers; the first one serves HTTP.",
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 32,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "maxLength": 63, "minLength": 1},
                                "image": {"type": "string"},
                                "command": {"type": "array", "items": {"type": "string"}},
                                "args": {"type": "array", "items": {"type": "string"}},
                                "ports": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["containerPort"],
                                        "properties": {
                                            "containerPort": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
                                            "name": {"type": "string"},
                                            "protocol": {"type": "string"}
                                        },
                                        "x-kubernetes-preserve-unknown-fields": true
                                    }
                                }
                            },
                            "x-kubernetes-preserve-unknown-fields": true
                        }
                    }
                },
                "x-kubernetes-preserve-unknown-fields": true
            }
        }
    })
}

/// The Function CRD.
///
/// Post-processed from the derived one: `nullable` is removed everywhere, so a `null`
/// written by a user is pruned by the API server instead of reaching the CEL rules (which
/// would fail on it) or the typed decoder.
pub fn function_crd() -> CustomResourceDefinition {
    let crd = Function::crd();
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    strip_nullable(&mut value);
    let root = &mut value["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    root["description"] = serde_json::Value::String(
        "A Function is an HTTP workload that zeroscale runs, routes to and scales, down to zero replicas when idle.".into(),
    );
    // The name also names the Function's Services (`<name>`, `<name>-private`) and its
    // EndpointSlice (`<name>-activator`): refuse at apply time what those can't carry.
    // The operator checks the same at runtime (API servers without CEL).
    root["x-kubernetes-validations"] = serde_json::json!([{
        "rule": "self.metadata.name.size() <= 53 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter) of at most 53 characters: it names the Function's Services"
    }]);
    serde_json::from_value(value).unwrap_or(crd)
}

fn strip_nullable(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("nullable");
            map.values_mut().for_each(strip_nullable);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nullable),
        _ => {}
    }
}

/// The CRD as YAML, exactly what `crds/function.yaml` holds.
pub fn function_crd_yaml() -> Result<String, crate::Error> {
    serde_yaml::to_string(&function_crd())
        .map_err(|e| crate::Error::Config(format!("serialising the CRD: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn schema() -> Value {
        let crd = serde_json::to_value(function_crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// Walks a schema and reports what a real API server refuses as non-structural.
    fn structural_problems(v: &Value, path: &str, out: &mut Vec<String>) {
        let Some(obj) = v.as_object() else { return };
        let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        if !obj.contains_key("type") && !preserve && !int_or_string {
            out.push(format!("{path}: type: Required value"));
        }
        for k in ["anyOf", "oneOf", "allOf", "$ref", "definitions", "$defs"] {
            if obj.contains_key(k) && !int_or_string {
                out.push(format!("{path}: {k} not allowed here"));
            }
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                structural_problems(p, &format!("{path}.{k}"), out);
            }
        }
        if let Some(items) = obj.get("items") {
            structural_problems(items, &format!("{path}[]"), out);
        }
        if let Some(ap) = obj.get("additionalProperties").filter(|a| a.is_object()) {
            structural_problems(ap, &format!("{path}{{}}"), out);
        }
    }

    #[test]
    fn crd_schema_is_structural() {
        let mut problems = vec![];
        structural_problems(&schema(), "", &mut problems);
        assert!(problems.is_empty(), "non-structural: {problems:#?}");
    }

    #[test]
    fn crd_fits_in_the_last_applied_annotation() {
        // `kubectl apply` stores the object as JSON in an annotation; all annotations
        // must stay under 256 KiB. Keep a wide margin.
        let json = serde_json::to_string(&function_crd()).unwrap();
        assert!(json.len() < 64 * 1024, "CRD is {} bytes", json.len());
    }

    #[test]
    fn crd_names_scope_and_columns() {
        let crd = function_crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("functions.zeroscale.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["fn".to_string()]));
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for want in ["URL", "Ready", "Replicas", "Desired", "Age"] {
            assert!(cols.contains(&want), "missing column {want}: {cols:?}");
        }
    }

    #[test]
    fn cel_rules_have_bounded_cost_and_every_field_is_documented() {
        let s = schema();
        let scale = &s["properties"]["spec"]["properties"]["scale"];
        let rules = scale["x-kubernetes-validations"].as_array().unwrap();
        assert_eq!(rules.len(), 3);
        let name_rule = s["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        assert!(name_rule.contains(&format!("<= {}", crate::operator::build::MAX_NAME_LEN)));
        fn undocumented(v: &Value, path: &str, out: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    let here = format!("{path}.{k}");
                    if p.get("description").is_none()
                        && !here.starts_with(".spec.template.")
                        && !here.starts_with(".status.conditions")
                    {
                        out.push(here.clone());
                    }
                    undocumented(p, &here, out);
                }
            }
        }
        let mut missing = vec![];
        undocumented(&s["properties"]["spec"], ".spec", &mut missing);
        undocumented(&s["properties"]["status"], ".status", &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    /// Every field name in the CRD, by where it sits, must be one the apiextensions.k8s.io/v1
    /// API of [`OLDEST_KUBERNETES`] knows: its API server decodes strictly and refuses the
    /// object otherwise (`fieldPath` and `reason` in a CEL rule were, before 1.28).
    #[test]
    fn crd_uses_only_fields_the_oldest_supported_api_server_knows() {
        const CRD: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
        const SPEC: &[&str] = &[
            "group",
            "names",
            "scope",
            "versions",
            "conversion",
            "preserveUnknownFields",
        ];
        const NAMES: &[&str] = &[
            "plural",
            "singular",
            "shortNames",
            "kind",
            "listKind",
            "categories",
        ];
        // `selectableFields` is 1.30+.
        const VERSION: &[&str] = &[
            "name",
            "served",
            "storage",
            "deprecated",
            "deprecationWarning",
            "schema",
            "subresources",
            "additionalPrinterColumns",
        ];
        const COLUMN: &[&str] = &[
            "name",
            "type",
            "format",
            "description",
            "priority",
            "jsonPath",
        ];
        const SUBRESOURCES: &[&str] = &["status", "scale"];
        const SCHEMA: &[&str] = &[
            "id",
            "$schema",
            "$ref",
            "description",
            "type",
            "format",
            "title",
            "default",
            "maximum",
            "exclusiveMaximum",
            "minimum",
            "exclusiveMinimum",
            "maxLength",
            "minLength",
            "pattern",
            "maxItems",
            "minItems",
            "uniqueItems",
            "multipleOf",
            "enum",
            "maxProperties",
            "minProperties",
            "required",
            "items",
            "allOf",
            "oneOf",
            "anyOf",
            "not",
            "properties",
            "additionalProperties",
            "patternProperties",
            "dependencies",
            "additionalItems",
            "definitions",
            "externalDocs",
            "example",
            "nullable",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-embedded-resource",
            "x-kubernetes-int-or-string",
            "x-kubernetes-list-map-keys",
            "x-kubernetes-list-type",
            "x-kubernetes-map-type",
            "x-kubernetes-validations",
        ];
        // `messageExpression` is 1.27+, `reason` and `fieldPath` 1.28+, `optionalOldSelf` 1.29+.
        const RULE: &[&str] = &["rule", "message"];

        fn keys(v: &Value, allowed: &[&str], path: &str, out: &mut Vec<String>) {
            for k in v.as_object().map(|o| o.keys()).into_iter().flatten() {
                if !allowed.contains(&k.as_str()) {
                    out.push(format!("{path}.{k}"));
                }
            }
        }
        fn schema(v: &Value, path: &str, out: &mut Vec<String>) {
            keys(v, SCHEMA, path, out);
            for (i, rule) in v["x-kubernetes-validations"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                keys(
                    rule,
                    RULE,
                    &format!("{path}.x-kubernetes-validations[{i}]"),
                    out,
                );
            }
            for (k, p) in v["properties"].as_object().into_iter().flatten() {
                schema(p, &format!("{path}.properties.{k}"), out);
            }
            if v["items"].is_object() {
                schema(&v["items"], &format!("{path}.items"), out);
            }
            if v["additionalProperties"].is_object() {
                schema(
                    &v["additionalProperties"],
                    &format!("{path}.additionalProperties"),
                    out,
                );
            }
        }

        let crd = serde_json::to_value(function_crd()).unwrap();
        let mut unknown = vec![];
        keys(&crd, CRD, "", &mut unknown);
        keys(&crd["spec"], SPEC, ".spec", &mut unknown);
        keys(&crd["spec"]["names"], NAMES, ".spec.names", &mut unknown);
        for (i, v) in crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let here = format!(".spec.versions[{i}]");
            keys(v, VERSION, &here, &mut unknown);
            keys(&v["subresources"], SUBRESOURCES, &here, &mut unknown);
            for c in v["additionalPrinterColumns"]
                .as_array()
                .into_iter()
                .flatten()
            {
                keys(
                    c,
                    COLUMN,
                    &format!("{here}.additionalPrinterColumns"),
                    &mut unknown,
                );
            }
            schema(
                &v["schema"]["openAPIV3Schema"],
                &format!("{here}.schema.openAPIV3Schema"),
                &mut unknown,
            );
        }
        assert!(
            unknown.is_empty(),
            "fields Kubernetes {OLDEST_KUBERNETES} refuses: {unknown:#?}"
        );
    }

    #[test]
    fn checked_in_crd_is_current() {
        let want = function_crd_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/function.yaml");
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "crds/function.yaml is stale: run `make crds` (cargo run -- crd > crds/function.yaml)"
        );
    }
}
