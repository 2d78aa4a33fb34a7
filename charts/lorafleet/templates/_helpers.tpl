{{/* Names shared by every template. */}}
{{- define "lorafleet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.peeringName" -}}
{{- default (include "lorafleet.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* What this release's operator watches, recorded on its ClusterRole so another release can see it ("*" = all). */}}
{{- define "lorafleet.scope" -}}
{{- if .Values.watchNamespaces -}}{{ join "," .Values.watchNamespaces }}{{- else -}}*{{- end -}}
{{- end -}}

{{- define "lorafleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lorafleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lorafleet.labels" -}}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/part-of: lorafleet
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The operator's rules, exactly manifests/clusterrole.yaml's (a test checks it). With watchNamespaces the chart
splits them: cluster-scoped resources stay in the ClusterRole, the rest go into a Role per watched namespace. */}}
{{- define "lorafleet.rules" -}}
  # Its own resources: kopf lists + watches them and patches finalizers/progress annotations; get_cr reads adapters.
  - apiGroups: [lorafleet.io]
    resources: [basemodels, loraadapters, continuallearningjobs]
    verbs: [get, list, watch, patch]
  # Status is always written with a merge patch.
  - apiGroups: [lorafleet.io]
    resources: [basemodels/status, loraadapters/status, continuallearningjobs/status]
    verbs: [patch]
  # Children carry ownerReferences with blockOwnerDeletion: that needs update on the owner's finalizers.
  - apiGroups: [lorafleet.io]
    resources: [basemodels/finalizers, loraadapters/finalizers]
    verbs: [update]
  # kopf: peering (one active replica; cluster-wide or per namespace) and discovery of the resources it serves.
  - apiGroups: [kopf.dev]
    resources: [clusterkopfpeerings, kopfpeerings]
    verbs: [get, list, watch, patch]
  - apiGroups: [apiextensions.k8s.io]
    resources: [customresourcedefinitions]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [namespaces]
    verbs: [get, list, watch]
  # Worker pods: watched; patched only to set the scale-down victims' controller.kubernetes.io/pod-deletion-cost.
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch, patch]
  # Children of a BaseModel: watched (drift repair) and server-side applied (create + patch).
  - apiGroups: [apps]
    resources: [deployments]
    verbs: [list, watch, create, patch]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [list, watch, create, patch]
  # Worker and per-adapter routing Services: watched, server-side applied, deleted with the adapter.
  - apiGroups: [""]
    resources: [services]
    verbs: [list, watch, create, patch, delete]
  # Routing EndpointSlices: watched, server-side applied (the whole endpoint list), deleted with the adapter.
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch, create, patch, delete]
  # The per-BaseModel worker admin token: created once and read back by name, never listed, watched or changed.
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, create]
  # Aggregated Events: created once per distinct message, then read and count-patched by name.
  - apiGroups: [""]
    resources: [events]
    verbs: [create, get, patch]
{{- end -}}

{{- define "lorafleet.clusterScopedResources" -}}
[customresourcedefinitions, namespaces, clusterkopfpeerings]
{{- end -}}

{{/* The rules restricted to cluster-scoped ("true") or namespaced ("false") resources, empty rules dropped. A
namespaced operator peers through KopfPeerings, so its ClusterRole leaves clusterkopfpeerings out. */}}
{{- define "lorafleet.scopedRules" -}}
{{- $cluster := include "lorafleet.clusterScopedResources" .root | fromYamlArray -}}
{{- range $rule := include "lorafleet.rules" .root | fromYamlArray }}
{{- $keep := list }}
{{- range $rule.resources }}
{{- if and (eq (has . $cluster) (eq $.clusterScoped "true")) (ne . "clusterkopfpeerings") }}{{ $keep = append $keep . }}{{ end }}
{{- end }}
{{- if $keep }}
- apiGroups: {{ toJson $rule.apiGroups }}
  resources: {{ toJson $keep }}
  verbs: {{ toJson $rule.verbs }}
{{- end }}
{{- end }}
{{- end -}}
