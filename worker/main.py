"""`lorafleet worker`: loads a model into the engine and serves the OpenAI + vLLM dynamic-LoRA API on HTTP.

The HTTP server starts at once and answers `/health` while the model loads in the engine thread; `/ready` turns 200
when the model (and any `--lora-modules`) is loaded, which is what the pod's readiness probe waits for.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
from pathlib import Path

from lorafleet.worker.names import InvalidName, adapter_name

log = logging.getLogger("lorafleet.worker")

TOKEN_ENV = "LORAFLEET_ADMIN_TOKEN"
API_KEY_ENV = "VLLM_API_KEY"
FEEDBACK_KEY_ENV = "LORAFLEET_FEEDBACK_API_KEY"


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum` (a bad value is argparse's usage error, not a traceback
    when the app is built)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet worker", description="Serve a base model and many LoRA adapters.")
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors) or a .gguf")
    p.add_argument("--served-model-name", default=None, help="the `model` name of the base (default: dir name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-loras", type=int, default=8, help="adapters in GPU slots at once")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--adapter-root", action="append", default=[], help="directory adapters may be loaded from")
    p.add_argument(
        "--source-cache",
        default=None,
        help="directory of downloaded s3:// and hf:// sources (default $LORAFLEET_SOURCE_CACHE or "
        "$LORAFLEET_CACHE/sources)",
    )
    p.add_argument("--source-cache-bytes", type=int, default=20 << 30, help="bound of the source cache")
    p.add_argument(
        "--claim-root", default="/var/lib/lorafleet/claims", help="where pvc://CLAIM/... sources are mounted"
    )
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3)")
    p.add_argument(
        "--lora-modules", action="append", default=[], metavar="NAME=PATH", help="adapters to load at start-up"
    )
    p.add_argument("--admin-token-file", default=None, help=f"bearer token for admin endpoints (or env {TOKEN_ENV})")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"bearer key the OpenAI inference routes require (vLLM's flag; or env {API_KEY_ENV})",
    )
    p.add_argument(
        "--feedback-api-key", default=None, help=f"bearer key /v1/feedback requires (or env {FEEDBACK_KEY_ENV})"
    )
    p.add_argument(
        "--feedback-adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="adapter whose feedback is stored without a training job for it in the pool ('*': any adapter)",
    )
    p.add_argument("--max-request-body-bytes", type=_count(1), default=4 << 20, help="larger request bodies get 413")
    p.add_argument(
        "--chat-template-timeout", type=float, default=2.0, help="seconds a chat template may render before 400"
    )
    p.add_argument(
        "--offload-threads",
        type=_count(1),
        default=min(4, os.cpu_count() or 1),
        help="threads that parse, tokenize and serialise big payloads off the event loop",
    )
    p.add_argument(
        "--offload-backlog", type=_count(0), default=8, help="queued offload jobs beyond the threads before 429"
    )
    p.add_argument(
        "--max-tokenize-tokens", type=_count(1), default=1 << 17, help="longest token list one /tokenize answer holds"
    )
    p.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS origins, a JSON list (vLLM)")
    p.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, a JSON list (vLLM)")
    p.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, a JSON list (vLLM)")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (vLLM)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--max-batched-tokens", "--max-num-batched-tokens", dest="max_batched_tokens", type=int, default=2048
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=256 << 20, help="KV cache size on CPU")
    p.add_argument("--kv-cache-fraction", type=float, default=0.5, help="share of free GPU memory for the KV cache")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=1024, help="waiting requests before 429 (0 = unbounded)")
    p.add_argument(
        "--max-adapter-labels", type=int, default=128, help="loaded adapters with their own metric labels (rest: other)"
    )
    p.add_argument(
        "--lora-admission",
        default="slot_aware",
        choices=["slot_aware", "fifo"],
        help="admit requests whose adapter is GPU-resident first (age-bounded), or in arrival order",
    )
    p.add_argument(
        "--max-admission-wait-steps", type=int, default=32, help="steps before a waiting request is served first"
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--no-triton-elementwise",
        action="store_true",
        help="GPU: run RMSNorm, rotary and SiLU-and-mul as torch ops instead of fused Triton kernels (A/B)",
    )
    p.add_argument(
        "--no-prefill-graphs", action="store_true", help="CUDA graphs for decode-only steps; prefill steps eager"
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each step before the previous step's tokens reach the host (default: on for a GPU, off on "
        "CPU; 1.4-1.8x closed-loop max load on an H200, see bench/ENGINE_GPU.md)",
    )
    p.add_argument(
        "--merge-switch",
        action="store_true",
        help="serve an adapter that dominates the batch merged into a copy of the base projections (dLoRA; costs "
        "that copy's memory; docs/merge-switch.md)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="reuse the KV blocks of identical prompt prefixes (vLLM's flag): the choices of an n > 1 request "
        "share their prompt's full blocks",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument("--log-level", default="INFO")
    return p


def read_admin_token(path: str | None) -> str | None:
    """The token from `--admin-token-file`, else from the environment; None (no auth) when neither is set."""
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise SystemExit(f"lorafleet worker: admin token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def parse_lora_modules(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"lorafleet worker: --lora-modules expects NAME=PATH, got {spec!r}")
        try:
            adapter_name(name.strip())
        except InvalidName as exc:
            raise SystemExit(f"lorafleet worker: --lora-modules {exc}") from exc
        out.append((name.strip(), path.strip()))
    return out


def read_key(value: str | None, env: str) -> str | None:
    """A key from its flag, else from the environment; None (the route's key check is off) when neither is set."""
    key = (value if value is not None else os.environ.get(env, "")).strip()
    return key or None


def feedback_adapters(names: list[str]) -> tuple[str, ...]:
    for name in names:
        if name != "*":
            try:
                adapter_name(name)
            except InvalidName as exc:
                raise SystemExit(f"lorafleet worker: --feedback-adapter {exc}") from exc
    return tuple(names)


def engine_config(args: argparse.Namespace):
    from lorafleet.worker.config import EngineConfig

    cfg = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_fraction=args.kv_cache_fraction,
        kv_cache_bytes=args.kv_cache_bytes,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        adapter_roots=list(args.adapter_root),
        enforce_eager=args.enforce_eager,
        prefill_graphs=not args.no_prefill_graphs,
        async_scheduling=args.async_scheduling,
        triton_elementwise=not args.no_triton_elementwise,
        lora_admission=args.lora_admission,
        max_admission_wait_steps=args.max_admission_wait_steps,
        merge_switch=args.merge_switch,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
    )
    try:
        cfg.validate()
    except ValueError as exc:  # a flag error: say so and exit 2 like argparse, no traceback
        raise SystemExit(f"lorafleet worker: {exc}") from exc
    return cfg


def api_settings(args: argparse.Namespace, served: str):
    """The HTTP layer's settings from the flags (credentials read from their files or environment)."""
    from lorafleet.worker.api import ApiSettings

    return ApiSettings(
        served_model_name=served,
        model_path=args.model,
        admin_token=read_admin_token(args.admin_token_file),
        api_key=read_key(args.api_key, API_KEY_ENV),
        feedback_api_key=read_key(args.feedback_api_key, FEEDBACK_KEY_ENV),
        feedback_adapters=feedback_adapters(args.feedback_adapter),
        max_model_len=args.max_model_len,
        max_body_bytes=args.max_request_body_bytes,
        chat_template_timeout_s=args.chat_template_timeout,
        offload_threads=args.offload_threads,
        offload_backlog=args.offload_backlog,
        max_tokenize_tokens=args.max_tokenize_tokens,
        allowed_origins=list(args.allowed_origins),
        allowed_methods=list(args.allowed_methods),
        allowed_headers=list(args.allowed_headers),
        allow_credentials=args.allow_credentials,
    )


def build_worker(args: argparse.Namespace):
    """(app, runner) for these arguments; the runner is started (the model loads in its thread)."""
    from lorafleet.worker.api import create_app
    from lorafleet.worker.async_engine import AsyncEngineRunner
    from lorafleet.worker.lora.sources.publish import VersionSink
    from lorafleet.worker.lora.sources.resolver import SourceResolver
    from lorafleet.worker.lora.sources.uri import scheme_of
    from lorafleet.worker.metrics import WorkerMetrics

    cfg = engine_config(args)
    modules = parse_lora_modules(args.lora_modules)
    served = args.served_model_name or Path(args.model.rstrip("/")).name
    settings = api_settings(args, served)
    metrics = WorkerMetrics(served, max_loras=args.max_loras, max_adapter_labels=args.max_adapter_labels)
    sources = SourceResolver(
        args.source_cache,
        args.source_cache_bytes,
        args.claim_root,
        registry=metrics.registry,
        s3_endpoint_url=args.s3_endpoint_url,
    )

    def factory():
        from lorafleet.worker.engine.llm_engine import LLMEngine

        if scheme_of(cfg.model) in ("s3", "hf", "pvc"):  # the weights land in the cache before the engine reads them
            cfg.model = str(sources.fetch(cfg.model, "model"))
        engine = LLMEngine(cfg)
        engine.store.resolvers.update(sources.adapter_resolvers())
        for name, path in modules:
            engine.load_adapter(name, path)
            log.info("adapter loaded", extra={"adapter": name, "path": path})
        freeze_startup_heap()
        return engine

    from lorafleet.worker.training.service import register

    runner = AsyncEngineRunner(factory, metrics=metrics, max_waiting=args.max_waiting)
    training = register(runner, metrics.registry)  # co-serving fine-tuning: the engine's one plugin (plugin.py)
    training.sink = VersionSink(sources)  # versions of store-backed adapters go to their store (docs/stores.md)
    runner.start()
    app = create_app(runner, settings, training=training)
    app.state.sources = sources
    return app, runner


def freeze_startup_heap() -> int:
    """Moves everything alive after start-up (model, tokenizer, CUDA graphs, adapter store) out of the cyclic
    collector's reach; returns how many objects it froze.

    Why: a full (generation-2) collection walks every tracked object, and it runs inside whichever engine step
    crossed the allocation threshold. On an H200 one such pass stalled a serving step for 276 ms
    (`bench/results/cl_timeslice_check.json`, `gc_seconds`), which every running request pays in its TPOT. What
    start-up built lives as long as the process, so scanning it again can never free anything (vLLM freezes its
    start-up heap for the same reason)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lorafleet.worker.logging import setup_logging

    setup_logging(json_lines=args.log_json, level=args.log_level)
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # no `*_created` series, as vLLM: half the page, no information
    app, runner = build_worker(args)
    log.info(
        "worker starting",
        extra={
            "model": args.model,
            "host": args.host,
            "port": args.port,
            "admin_auth": bool(app.state.settings.admin_token),  # whether there is one; the token is never logged
            "api_key": bool(app.state.settings.api_key),
            "feedback_api_key": bool(app.state.settings.feedback_api_key),
        },
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal to the handler that was there
    # before it; with this one in place the re-raise lands here, so the engine thread is stopped and we exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=True)
    except _Stop:
        pass
    finally:
        for hook in list(getattr(app.state, "shutdown_hooks", [])):
            try:
                hook()
            except Exception:  # noqa: BLE001 - shutting down anyway; say what failed
                log.exception("shutdown hook failed")
        runner.stop()
    failed = runner.error not in (None, "engine stopped")
    log.info("worker stopped", extra={"error": runner.error if failed else None})
    return 1 if failed else 0


class _Stop(Exception):
    """Raised by the signal handler after uvicorn's graceful shutdown."""


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signum)
