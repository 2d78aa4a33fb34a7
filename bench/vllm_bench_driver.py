"""Runs `vllm bench serve` several times in one process: vLLM's own client code, imported once.

Why: each `python -m vllm.entrypoints.cli.main bench serve` pays ~13-15 s of imports and set-up before its first
request (measured on an H100 machine: a 1 s run took 16-17 s of wall time), which across the ~10 runs of a
`vs_vllm.py` set is minutes of a GPU lease. The driver imports `vllm.benchmarks.serve` once and calls its `main` with
the same arguments the CLI would parse (`add_cli_args` is the CLI's own parser setup).

Protocol (stdin/stdout, one line each): the parent writes a JSON list of `bench serve` arguments; the driver runs
it and prints `@@done <rc>` (0 when vLLM's main returned, 1 with the traceback above it). Every other output line
is vLLM's own printing, which the parent copies to its log.
"""

from __future__ import annotations

import json
import sys
import traceback

DONE = "@@done"


def main() -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser
    except ImportError:  # another vLLM layout: its parser is an argparse.ArgumentParser too
        from argparse import ArgumentParser as Parser
    print(f"{DONE} 0", flush=True)  # imports done: ready for the first run
    for line in sys.stdin:
        if not line.strip():
            continue
        rc = 0
        try:
            parser = Parser(prog="vllm bench serve")
            add_cli_args(parser)
            bench_main(parser.parse_args(json.loads(line)))
        except BaseException:  # noqa: BLE001 - report and keep serving the next run (argparse raises SystemExit)
            traceback.print_exc(file=sys.stdout)
            rc = 1
        print(f"{DONE} {rc}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
