"""Names shared by the operator's builders, handlers and the local kubelet shim.

One place for label keys and annotation names, so that the builders that write them and the code that selects on
them can never drift apart.
"""

from __future__ import annotations

GROUP = "lorafleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
BASEMODELS = "basemodels"
ADAPTERS = "loraadapters"
CLJOBS = "continuallearningjobs"

LABEL_BASEMODEL = "lorafleet.io/basemodel"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_ADAPTER = "lorafleet.io/adapter"
MANAGER = "lorafleet-operator"
COMPONENT_WORKER = "worker"
COMPONENT_ROUTE = "adapter-route"

# Local mode: the kubelet shim writes the loopback address of the real worker process behind a KWOK pod here.
ANNOT_LOCAL_ENDPOINT = "lorafleet.io/local-endpoint"
# Continual learning, on the LoRAAdapter: newest published version (source path + number) and the training pod.
ANNOT_PUBLISHED_SOURCE = "lorafleet.io/published-source"
ANNOT_PUBLISHED_VERSION = "lorafleet.io/published-version"
ANNOT_PUBLISHED_VERSIONS = "lorafleet.io/published-versions"  # JSON {version: path}, newest 20 (spec.version pins)
ANNOT_TRAINER_POD = "lorafleet.io/trainer-pod"
ANNOT_JOB_TRAINER = "lorafleet.io/trainer"  # on the ContinualLearningJob: the pod it trains on
# Prefix for kopf's own progress/diff-base annotations so they live under our domain.
KOPF_PREFIX = "lorafleet.io"

ENDPOINTSLICE_MANAGED_BY = "lorafleet-operator"
ADMIN_TOKEN_KEY = "token"
ADMIN_TOKEN_DIR = "/var/run/lorafleet/admin"
DEFAULT_WORKER_PORT = 8000
DEFAULT_ADAPTER_ROOT = "/var/lib/lorafleet/adapters"
