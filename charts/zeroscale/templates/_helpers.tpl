{{/*
Names, labels and the RBAC rules shared by the templates.
*/}}

{{- define "zeroscale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name. Kept short enough that "<fullname>-activator" and the
other suffixes stay within the 63 characters of a DNS label (Service names are one).
*/}}
{{- define "zeroscale.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "zeroscale.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "zeroscale.labels" -}}
helm.sh/chart: {{ include "zeroscale.chart" . }}
app.kubernetes.io/name: {{ include "zeroscale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zeroscale
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "zeroscale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zeroscale.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "zeroscale.componentLabels" -}}
{{ include "zeroscale.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "zeroscale.operator.fullname" -}}
{{- printf "%s-operator" (include "zeroscale.fullname" .) }}
{{- end }}

{{- define "zeroscale.activator.fullname" -}}
{{- printf "%s-activator" (include "zeroscale.fullname" .) }}
{{- end }}

{{- define "zeroscale.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "zeroscale.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "zeroscale.activator.serviceAccountName" -}}
{{- if .Values.activator.serviceAccount.create }}
{{- default (include "zeroscale.activator.fullname" .) .Values.activator.serviceAccount.name }}
{{- else }}
{{- required "activator.serviceAccount.name is required when activator.serviceAccount.create is false" .Values.activator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "zeroscale.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "zeroscale.defaultsPath" -}}
/etc/zeroscale/defaults.yaml
{{- end }}

{{/*
Environment both components read: their own identity from the downward API (the lease
holder identity, the lease namespace, the `$(POD_NAMESPACE)` in the operator's args)
and the log settings.
*/}}
{{- define "zeroscale.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
- name: ZEROSCALE_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
{{- end }}

{{/*
RBAC rules. These mirror src/operator/rbac.rs (OPERATOR_RULES, ACTIVATOR_RULES), the API
calls the code makes; tests/packaging.rs fails when the two differ. "watched" rules go
into a ClusterRole, or a Role per watched namespace; "local" rules into a Role in the
release namespace.
*/}}
{{- define "zeroscale.operator.watchedRules" -}}
{{- /* patch: the finalizer of a Function that scales an existing workload. */}}
- apiGroups: ["zeroscale.dev"]
  resources: ["functions"]
  verbs: ["list", "patch", "watch"]
- apiGroups: ["zeroscale.dev"]
  resources: ["functions/status"]
  verbs: ["patch"]
{{- /* Server-side apply is authorized as create for a new object, patch for one that exists. */}}
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["create", "get", "list", "patch", "watch"]
{{- /* StatefulSets are only read: they can be a Function's scale target. */}}
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale", "statefulsets/scale"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "get", "list", "patch", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["create", "get", "list", "patch", "watch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "zeroscale.operator.localRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create", "get", "update"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "zeroscale.activator.watchedRules" -}}
- apiGroups: ["zeroscale.dev"]
  resources: ["functions"]
  verbs: ["list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: ["apps"]
  resources: ["deployments/scale", "statefulsets/scale"]
  verbs: ["get", "update"]
{{- /* list: a drain's stopping pods; watch: a waking Function's new pods, probed directly. */}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "zeroscale.activator.localRules" -}}
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
The activators' lame-duck time in seconds: the value when set, else 1.5 times the time
the operator takes to rewrite every Function's activator slice (functions /
operator.sliceWritesPerSecond), at least 30 s.
*/}}
{{- define "zeroscale.lameDuckSeconds" -}}
{{- $set := .Values.activator.lameDuckTimeoutSeconds -}}
{{- if not (kindIs "invalid" $set) -}}
{{- $set -}}
{{- else -}}
{{- $rate := max 1 (int .Values.operator.sliceWritesPerSecond) -}}
{{- $functions := int .Values.functions -}}
{{- max 30 (div (add (mul $functions 3) (mul $rate 2) -1) (mul $rate 2)) -}}
{{- end -}}
{{- end -}}

{{/*
The activators' lame-duck limit in seconds: the value when set, else 5/3 of the
lame-duck time (2.5 times the rewrite time when that is computed: 500 s for the
defaults), never below it. Past the lame-duck time a stopping activator keeps waiting
only while Functions' routing is still seen to shrink.
*/}}
{{- define "zeroscale.lameDuckLimitSeconds" -}}
{{- $timeout := include "zeroscale.lameDuckSeconds" . | int -}}
{{- $set := .Values.activator.lameDuckLimitSeconds -}}
{{- if not (kindIs "invalid" $set) -}}
{{- max $timeout (int $set) -}}
{{- else -}}
{{- div (add (mul $timeout 5) 2) 3 -}}
{{- end -}}
{{- end -}}
