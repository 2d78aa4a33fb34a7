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


def _checked(value: object, what: str, pattern, max_len: int, rule: str) -> str:
    """`value` if it is a non-empty string that matches `pattern` within `max_len` characters; else InvalidName."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{what} name must be a non-empty string")
    if len(value) > max_len or not pattern.match(value):
        raise InvalidName(f"{what} name {_shown(value)} must be {rule}, at most {max_len} characters")
    return value


def adapter_name(value: object) -> str:
    """Returns `value` if it is a valid adapter name (a DNS-1123 subdomain, at most 253 characters)."""
    rule = "a DNS-1123 subdomain: lowercase alphanumerics, '-' and '.', starting and ending with an alphanumeric"
    return _checked(value, "adapter", SUBDOMAIN, SUBDOMAIN_MAX, rule)


def job_name(value: object) -> str:
    """Returns `value` if it is a valid training-job name (a DNS-1123 label, at most 63 characters)."""
    rule = "a DNS-1123 label: lowercase alphanumerics and '-', starting and ending with an alphanumeric"
    return _checked(value, "job", LABEL, LABEL_MAX, rule)


def is_adapter_name(value: object) -> bool:
    try:
        adapter_name(value)
    except InvalidName:
        return False
    return True
