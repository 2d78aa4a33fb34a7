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
    # worker pods: read-only (index + wake-ups).
    | _rules([""], ["pods"], ["get", "list", "watch"])
    # children: create, then merge-patch on conflict (kube.Kube.apply).
    | _rules(["apps"], ["deployments"], ["create", "patch"])
    | _rules([""], ["services"], ["create", "patch", "get", "delete"])
    | _rules(["policy"], ["poddisruptionbudgets"], ["create", "patch"])
    # routing: create, read + replace (whole endpoint list), delete on adapter removal.
    | _rules(["discovery.k8s.io"], ["endpointslices"], ["create", "get", "update", "delete"])
    # the admin token: created once, read back by name; never listed or watched.
    | _rules([""], ["secrets"], ["create", "get"])
    | _rules([""], ["events"], ["create"])
)
