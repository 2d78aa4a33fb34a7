"""`lorafleet fetch URI --kind model --link PATH`: resolves a source into the cache and links PATH to it.

Why: a stock vLLM container reads a local directory, so for `s3://` models an init container (the worker image)
runs this into the pod's `/cache` emptyDir and vLLM gets `--model PATH`, with the same verification as our workers.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet fetch", description="Download and verify a model or adapter source.")
    p.add_argument("uri")
    p.add_argument("--kind", choices=["model", "adapter"], default="model")
    p.add_argument("--cache", default=None, help="source cache directory (default $LORAFLEET_SOURCE_CACHE)")
    p.add_argument("--claim-root", default="/var/lib/lorafleet/claims")
    p.add_argument("--link", default=None, help="symlink to create (atomically replaced) pointing at the result")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from lorafleet.worker.lora.sources.errors import SourceError
    from lorafleet.worker.lora.sources.resolver import SourceResolver

    try:
        path = SourceResolver(args.cache, claim_root=args.claim_root).fetch(args.uri, args.kind)
    except SourceError as exc:
        print(f"lorafleet fetch: {exc}", flush=True)
        return 1
    if args.link:
        link = Path(args.link)
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, link)
    print(path, flush=True)
    return 0
