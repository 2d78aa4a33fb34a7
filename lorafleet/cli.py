"""The `lorafleet` console script: one entry point, subcommands implemented next to the code they run.

Each subcommand imports its module lazily so that `lorafleet operator` never imports torch and
`lorafleet worker` never imports kopf.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "worker": ("lorafleet.worker.main", "main", "run a worker engine (OpenAI + vLLM dynamic-LoRA API)"),
    "fetch": ("lorafleet.worker.lora.sources.cli", "main", "download and verify a model or adapter source"),
    "operator": ("lorafleet.operator.main", "main", "run the kopf operator"),
    "drain-wait": ("lorafleet.prestop", "main", "preStop hook: wait until the operator has drained this worker"),
    "up": ("lorafleet.local.up", "up_main", "bring up a local fleet: control plane, operator, CPU workers, samples"),
    "down": ("lorafleet.local.up", "down_main", "tear down the local fleet started by `lorafleet up`"),
    "cluster": ("lorafleet.controlplane", "main", "run only the local control plane (etcd, kube-apiserver, ...)"),
}


def _usage() -> str:
    lines = ["usage: lorafleet <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"lorafleet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
