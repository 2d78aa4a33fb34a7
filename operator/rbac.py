"""What the operator really calls on the API server, as (apiGroup, resource, verb) triples.

Kept next to the code that makes the calls (kube.py, kopf's watches and patches, Events) so that a test can compare
it with the ClusterRole shipped in manifests/: every rule the operator needs must be granted, and every grant beyond
this list is reported as surplus.
"""

from __future__ import annotations

from itertools import product

G = "lorafleet.io"


def _rules(groups: list[str], resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return set(product(groups, resources, verbs))


USED: set[tuple[str, str, str]] = (
    # kopf: list+watch our CRs, patch finalizers and its progress annotations; our status writes are patches.
    _rules([G], ["basemodels", "loraadapters", "continuallearningjobs"], ["get", "list", "watch", "patch"])
    | _rules([G], ["basemodels/status", "loraadapters/status", "continuallearningjobs/status"], ["patch"])
    # ownerReferences with blockOwnerDeletion need update on the owner's finalizers subresource.
    | _rules([G], ["basemodels/finalizers", "loraadapters/finalizers"], ["update"])
    # kopf peering (one active replica), resource discovery, cluster-wide namespace scanning.
    | _rules(["kopf.dev"], ["clusterkopfpeerings", "kopfpeerings"], ["get", "list", "watch", "patch"])
    | _rules(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["get", "list", "watch"])
    | _rules([""], ["namespaces"], ["get", "list", "watch"])
    # worker pods: watched (index + wake-ups); patched only for the scale-down victims' pod-deletion-cost annotation.
    | _rules([""], ["pods"], ["get", "list", "watch", "patch"])
    # children: watched (drift from any cause wakes the fleet) and server-side applied (patch; create for the first
    # apply, which creates the object).
    | _rules(["apps"], ["deployments"], ["list", "watch", "create", "patch"])
    | _rules(["policy"], ["poddisruptionbudgets"], ["list", "watch", "create", "patch"])
    | _rules([""], ["services"], ["list", "watch", "create", "patch", "delete"])
    | _rules(["discovery.k8s.io"], ["endpointslices"], ["list", "watch", "create", "patch", "delete"])
    # the admin token: created once, read back by name; never listed, watched or changed.
    | _rules([""], ["secrets"], ["create", "get"])
    # aggregated Events (events.py): created, read and count-patched by name.
    | _rules([""], ["events"], ["create", "get", "patch"])
)
