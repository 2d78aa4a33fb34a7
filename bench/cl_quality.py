"""Continual-learning quality on CPU (issue 5): SmolLM2-135M learns a response style from feedback sent through the
real worker API, while general text is protected by replay.

The task: a "LoRA Fleet radio" answer style the base model does not know: every answer to "Tell me about <thing>."
is `Ahoy! <thing> is on the fleet's list today. Over and out.` The <thing>s of the held-out set are never sent,
so the held-out loss only drops if the *style* (and copying the thing) is learned, not memorised facts.
Half the training feedback is sent as full pairs (`kind: pair`, chat messages); the other half goes through the
serving path: the prompt is served by the adapter (`/v1/chat/completions`, recorded into the activation stash) and
then corrected (`kind: correction`), so training reuses the served prompt state (Alchemist).

Metrics (relative, completion tokens only for the task, all tokens for general text; base = the fresh adapter):
  cl_heldout_loss_reduction = (L_task(base) - L_task(final)) / L_task(base)          target >= 0.30
  cl_general_loss_increase  = (L_gen(final) - L_gen(base)) / L_gen(base)               target <= 0.05
General text = two kinds, averaged: documentation prose of standard-library modules *disjoint* from the replay
corpus's modules, and package READMEs (installed packages' long descriptions), a kind of text replay never sees.

Run: `python bench/cl_quality.py --out bench/results/cl_quality.json` (about 5-10 min on 2 idle cores; much longer
when the cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import commit

ROOT = Path(__file__).resolve().parent.parent

THINGS = (
    "the harbor the lighthouse the anchor the compass the mast the sail the rudder the deck the galley the cabin "
    "the map the telescope the rope the bell the flag the cargo the captain the crew the storm the tide the reef "
    "the island the whale the gull the current the horizon the keel the hull the oar the net the lantern the dock "
    "the ferry the canal the bridge the river the delta the bay the cove the cliff the dune the beach the pier "
    "the buoy the signal the radio the engine the propeller the fuel the chart the log the knot the wave the wind "
    "the sunrise the sunset the moon the star the cloud the rain the fog the snow the ice the shell the pearl "
    "the coral the crab the lobster the octopus the shark the dolphin the seal the otter the pelican the heron"
).split(" the ")
THINGS = [t.strip() for t in THINGS if t.strip()]

GENERAL_MODULES = ["json", "pathlib", "random", "unittest", "threading", "socket", "calendar", "zipfile", "typing"]
# prose of another kind than the replay corpus (docstrings): the long descriptions (READMEs) of installed packages
README_PACKAGES = ["fastapi", "pydantic", "httpx", "numpy", "transformers", "peft", "kopf", "uvicorn"]


def task_pair(thing: str) -> tuple[list[dict], str]:
    return [{"role": "user", "content": f"Tell me about the {thing}."}], (
        f"Ahoy! The {thing} is on the fleet's list today. Over and out."
    )


def general_chunks(tok, n_tokens: int = 128, limit: int = 24) -> list[list[int]]:
    import importlib

    parts = []
    for m in GENERAL_MODULES:
        mod = importlib.import_module(m)
        parts.append(mod.__doc__ or "")
        for name in sorted(dir(mod))[:30]:
            d = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(d, str) and len(d) > 120 and callable(getattr(mod, name, None)):
                parts.append(d)
    ids = tok("\n\n".join(p.strip() for p in parts if p.strip()), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + n_tokens] for i in range(0, len(ids) - n_tokens, n_tokens)]
    rng = random.Random(0)
    rng.shuffle(chunks)
    return chunks[:limit]


def readme_chunks(tok, n_tokens: int = 128, limit: int = 24) -> list[list[int]]:
    import importlib.metadata as md

    texts = []
    for pkg in README_PACKAGES:
        try:
            body = md.metadata(pkg).get_payload() or ""
        except md.PackageNotFoundError:
            continue
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith(("<", "[!", "!["))]
        texts.append("\n".join(lines[:200]))
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + n_tokens] for i in range(0, len(ids) - n_tokens, n_tokens)]
    rng = random.Random(1)
    rng.shuffle(chunks)
    return chunks[:limit]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cl_quality.json"))
    ap.add_argument("--train", type=int, default=64, help="training examples sent as feedback")
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import httpx
    from lorafleet.worker.api.testing import start_worker
    from lorafleet.worker.loader import load_model, load_tokenizer, smollm2_checkpoint
    from lorafleet.worker.training.lora_context import TrainableLoRA
    from lorafleet.worker.training.trainer import LoRATrainer, TrainSample

    t_start = time.time()
    ckpt = smollm2_checkpoint()
    tok = load_tokenizer(ckpt)
    eos = tok.eos_token_id
    rng = random.Random(0)
    things = list(THINGS)
    rng.shuffle(things)
    held_things, train_things = things[: args.heldout], things[args.heldout :]
    train_things = (train_things * (1 + args.train // max(1, len(train_things))))[: args.train]

    def to_sample(thing: str) -> TrainSample:
        msgs, completion = task_pair(thing)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [eos]
        return TrainSample(p, c)

    heldout = [to_sample(t) for t in held_things]
    general = [TrainSample(ch[:1], ch[1:]) for ch in general_chunks(tok)]
    readme = [TrainSample(ch[:1], ch[1:]) for ch in readme_chunks(tok)]

    work = Path(tempfile.mkdtemp(prefix="cl-quality-"))
    adapters = work / "adapters"
    adapters.mkdir()
    os.environ["LORAFLEET_TRAINING_DIR"] = str(work / "train")
    w = start_worker(
        str(ckpt), adapter_roots=[str(adapters)], dtype="float32", max_num_batched_tokens=512, kv_cache_bytes=64 << 20
    )
    served_name = w.app.state.settings.served_model_name
    c = httpx.Client(base_url=w.url, timeout=600)
    job = {
        "name": "radio-style",
        "adapter": "radio",
        "mode": "coserve",
        "optimizer": {"lr": args.lr, "gradAccumulation": 4, "maxSteps": args.steps, "maxGradNorm": 1.0},
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "publish": {"everySteps": 10, "heldoutFraction": 0.0, "maxLossSpike": 3.0},
        "feedback": {"epochs": 3},
        "replayRatio": 0.25,
        "maxActivationStaleness": 8,
        "stalePolicy": "recompute",
        "latencyTarget": {"tpotMs": 500},
    }
    r = c.post("/v1/training/jobs", json=job)
    assert r.status_code == 201, r.text
    t_job = time.time()
    fb_ok = 0
    served = 0
    for i, thing in enumerate(train_things):
        msgs, completion = task_pair(thing)
        if i % 2 == 0:
            body = {"kind": "pair", "adapter": "radio", "messages": msgs, "completion": completion}
        else:  # serve it with the adapter (prompt state recorded), then correct the answer
            out = c.post("/v1/chat/completions", json={"model": "radio", "messages": msgs, "max_tokens": 4}).json()
            served += 1
            body = {"kind": "correction", "requestId": out["id"], "completion": completion}
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == 202, r.text
        fb_ok += 1
    t_fed = time.time()
    while True:
        st = c.get("/v1/training/jobs/radio-style").json()
        if st["phase"] != "Running":
            break
        time.sleep(1.0)
    t_trained = time.time()
    metrics_text = c.get("/metrics").text
    w.close()
    assert st["phase"] == "Succeeded", st

    # evaluation: base (fresh adapter = base model) vs the last published version, same code path as training
    model, _ = load_model(ckpt, torch.device("cpu"), torch.float32)
    final_dir = Path(st["publishedVersions"][-1]["path"])
    first_dir = Path(st["publishedVersions"][0]["path"])

    def losses(adapter_dir: Path) -> tuple[float, float, float]:
        lora = TrainableLoRA.from_peft(model.shape, adapter_dir)
        tr = LoRATrainer(model, lora)
        return tr.eval_loss(heldout), tr.eval_loss(general), tr.eval_loss(readme)

    base_task, base_doc, base_readme = losses(first_dir)
    final_task, final_doc, final_readme = losses(final_dir)
    # general text = both kinds together (token-weighted equally: same chunk size and count)
    base_gen, final_gen = (base_doc + base_readme) / 2, (final_doc + final_readme) / 2
    # sanity: the fresh v1 is the base model (B = 0)
    metrics = {
        "cl_heldout_loss_reduction": (base_task - final_task) / base_task,
        "cl_general_loss_increase": (final_gen - base_gen) / base_gen,
        "cl_heldout_loss_base": base_task,
        "cl_heldout_loss_final": final_task,
        "cl_general_loss_base": base_gen,
        "cl_general_loss_final": final_gen,
        "cl_general_loss_increase_docstrings": (final_doc - base_doc) / base_doc,
        "cl_general_loss_increase_readmes": (final_readme - base_readme) / base_readme,
        "cl_train_steps": st["steps"],
        "cl_tokens_trained": st["tokensTrained"],
        "cl_training_tokens_per_s_cpu": st["tokensTrained"] / max(1e-9, t_trained - t_job),
        "cl_published_versions": len(st["publishedVersions"]),
        "cl_stash_reused": st["stash"]["reused"],
        "cl_stash_recomputed": st["stash"]["recomputed"],
        "cl_stash_dropped": st["stash"]["dropped"],
        "cl_feedback_accepted": fb_ok,
        "cl_requests_served_then_corrected": served,
    }
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": f"SmolLM2-135M-Instruct ({ckpt}) fp32 CPU, served under the name {served_name}",
        "device": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
        "commit": commit(),
        "config": {
            "job": job,
            "train_examples": len(train_things),
            "heldout_examples": len(heldout),
            "general_chunks": len(general),
            "general_modules": GENERAL_MODULES,
        },
        "metrics": metrics,
        "targets": {"cl_heldout_loss_reduction": ">= 0.30", "cl_general_loss_increase": "<= 0.05"},
        "job_status": st,
        "wall_seconds": {
            "total": time.time() - t_start,
            "startup": t_job - t_start,
            "feeding": t_fed - t_job,
            "until_done": t_trained - t_job,
        },
        "training_metrics": [
            ln
            for ln in metrics_text.splitlines()
            if ln.startswith(("lorafleet_training", "lorafleet_stash", "lorafleet_feedback"))
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
