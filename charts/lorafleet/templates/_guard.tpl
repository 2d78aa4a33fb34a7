{{/* One operator per object: installing (or upgrading to) a release whose watched namespaces overlap another
LoRA Fleet release's fails, naming that release. Each release records its scope on its ClusterRole
(lorafleet.io/watch-namespaces: "*" or "a,b"). `helm template` has no cluster to look at and skips the check. */}}
{{- define "lorafleet.guard" -}}
{{- $mine := include "lorafleet.scope" . | splitList "," -}}
{{- range $role := (lookup "rbac.authorization.k8s.io/v1" "ClusterRole" "" "").items | default list }}
{{- $labels := $role.metadata.labels | default dict }}
{{- if and (eq (get $labels "app.kubernetes.io/part-of") "lorafleet") (eq (get $labels "app.kubernetes.io/component") "operator") (ne (get $labels "app.kubernetes.io/instance") $.Release.Name) }}
{{- $theirs := get ($role.metadata.annotations | default dict) "lorafleet.io/watch-namespaces" | default "*" | splitList "," }}
{{- $overlap := or (has "*" $mine) (has "*" $theirs) }}
{{- range $mine }}{{ if has . $theirs }}{{ $overlap = true }}{{ end }}{{ end }}
{{- if $overlap }}
{{- fail (printf "release %s already runs a LoRA Fleet operator for namespaces %s; two operators would fight over the same objects (set watchNamespaces to disjoint lists, or uninstall it)" (get $labels "app.kubernetes.io/instance") (join "," $theirs)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
