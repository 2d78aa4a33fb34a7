"""KWOK configuration: the stages that move fake nodes and pods through their lives.

The bare `kwok` binary ships no default stages (only kwokctl does), so we describe the lifecycle we need:
a node becomes Ready (KWOK then keeps its lease fresh); a pod bound to a fake node becomes Running + Ready with a
pod IP from the node's pod CIDR; a pod marked for deletion is removed once no finalizer holds it. Pods annotated `kwok.x-k8s.io/status=custom`
are left alone, so `lorafleet up` can write the real addresses of local worker processes into their status itself.
Templates are Go templates (KWOK funcs + sprig), kept in a plain string with `@CIDR@`-style placeholders.
"""

from __future__ import annotations

CUSTOM_STATUS_SELECTOR = "kwok.x-k8s.io/status=custom"

_NODE_CONDITIONS = """\
      {{ $now := Now }}
      {{ $since := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - type: {{ .type | Quote }}
        status: {{ .status | Quote }}
        reason: {{ .reason | Quote }}
        message: {{ .message | Quote }}
        lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $since | Quote }}
      {{ end }}
"""

_TEMPLATE = """\
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  cidr: "@CIDR@"
  nodeLeaseDurationSeconds: @LEASE@
  disregardStatusWithAnnotationSelector: "@CUSTOM@"
  # A config file skips some of kwok's flag defaults, so the worker counts are explicit.
  podPlayStageParallelism: 4
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 4
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: lorafleet-node-ready
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ["True"]
  next:
    statusTemplate: |
@CONDITIONS@
      {{ with .status.addresses }}
      addresses:
      {{ YAML . 1 }}
      {{ end }}
      {{ with .status.allocatable }}
      allocatable:
      {{ YAML . 1 }}
      {{ end }}
      {{ with .status.capacity }}
      capacity:
      {{ YAML . 1 }}
      {{ end }}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: lorafleet-node-heartbeat
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: In
      values: ["True"]
  delay:
    durationMilliseconds: 300000
    jitterDurationMilliseconds: 310000
  next:
    statusTemplate: |
@CONDITIONS@
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: lorafleet-pod-running
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: DoesNotExist
    - key: .status.phase
      operator: In
      values: [Pending]
  next:
    statusTemplate: |
      {{ $now := Now }}
      phase: Running
      startTime: {{ $now | Quote }}
      conditions:
      {{ range list "PodScheduled" "Initialized" "ContainersReady" "Ready" }}
      - type: {{ . }}
        status: "True"
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      {{ range .spec.readinessGates }}
      - type: {{ .conditionType | Quote }}
        status: "True"
        lastTransitionTime: {{ $now | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        imageID: ""
        ready: true
        started: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      {{ with NodeIPsWith .spec.nodeName }}
      hostIP: {{ index . 0 | Quote }}
      hostIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
      {{ with PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) .metadata.uid .metadata.name .metadata.namespace }}
      podIP: {{ index . 0 | Quote }}
      podIPs:
      {{ range . }}
      - ip: {{ . | Quote }}
      {{ end }}
      {{ end }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: lorafleet-pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: Exists
    # a finalizer (the local kubelet shim's, while its worker process drains) keeps the pod until it is released
    - key: .metadata.finalizers
      operator: DoesNotExist
  next:
    delete: true
"""


def kwok_configuration(cidr: str, lease_seconds: int = 40) -> str:
    """A multi-document YAML for `kwok --config`: options plus our node and pod stages."""
    return (
        _TEMPLATE.replace("@CONDITIONS@", _NODE_CONDITIONS.rstrip("\n"))
        .replace("@CIDR@", cidr)
        .replace("@LEASE@", str(lease_seconds))
        .replace("@CUSTOM@", CUSTOM_STATUS_SELECTOR)
    )
