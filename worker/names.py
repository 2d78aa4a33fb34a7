"""The one validator for adapter and training-job names, applied at every entry point before anything touches disk.

Why the Kubernetes rules: an adapter served here is a `LoRAAdapter` object and a training job a
`ContinualLearningJob`, whose names the CRDs (crds/) already constrain to a DNS-1123 subdomain. The same rule keeps
a name safe as a single path component (no `/`, no `..`, no leading dot), as a log field (no newline or escape
byte) and as a metric label value (bounded length). The worker accepts exactly what the cluster can name.
"""

from __future__ import annotations

import re

# crds/lorafleet.io_loraadapters.yaml spec.baseModel, crds/lorafleet.io_continuallearningjobs.yaml spec.adapter
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SUBDOMAIN_MAX = 253
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_MAX = 63


class InvalidName(ValueError):
    """A name that the Kubernetes rules refuse; the message says which rule and never echoes control bytes."""


def _shown(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def adapter_name(value: object) -> str:
    """Returns `value` if it is a valid adapter name (a DNS-1123 subdomain, at most 253 characters)."""
    if not isinstance(value, str) or not value:
        raise InvalidName("adapter name must be a non-empty string")
    if len(value) > SUBDOMAIN_MAX or not SUBDOMAIN.match(value):
        raise InvalidName(
            f"adapter name {_shown(value)} must be a DNS-1123 subdomain: lowercase alphanumerics, '-' and '.', "
            f"starting and ending with an alphanumeric, at most {SUBDOMAIN_MAX} characters"
        )
    return value


def job_name(value: object) -> str:
    """Returns `value` if it is a valid training-job name (a DNS-1123 label, at most 63 characters)."""
    if not isinstance(value, str) or not value:
        raise InvalidName("job name must be a non-empty string")
    if len(value) > LABEL_MAX or not LABEL.match(value):
        raise InvalidName(
            f"job name {_shown(value)} must be a DNS-1123 label: lowercase alphanumerics and '-', starting and "
            f"ending with an alphanumeric, at most {LABEL_MAX} characters"
        )
    return value


def is_adapter_name(value: object) -> bool:
    try:
        adapter_name(value)
    except InvalidName:
        return False
    return True
