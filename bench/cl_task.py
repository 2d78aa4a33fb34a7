"""Continual learning that measurably learns (issue 18), on CPU with SmolLM2-135M through the real worker API.

The task: a procedural skill the base model does not have. A harbour log sentence about a fictional ship goes in,
a fixed-format record comes out:

    Log: At 14:05, the Quorvane reached berth 17 with a load of salt.
    Record: ship=Quorvane berth=17 cargo=salt time=14:05

Training feedback uses four sentence templates; the held-out test items use three *other* templates and ships,
berths and times that never occur in training, so the score only rises if the skill (find four fields in any
phrasing, write them in order) is learned, not the items. Every training item is served by the adapter being
trained (`/v1/completions`, prompt state recorded into the activation stash) and then corrected
(`kind: correction`), the way a grader fixes served answers.

Runs (each the same feedback, the same LoRA config and optimizer, the same feedback samples per optimizer step
and the same number of steps, so only the named difference changes):
  online     the ContinualLearningJob co-serving in the worker as a job gets it by default: replay at the job
             default, `recordActivations: false` (prompts forwarded again, full gradient)
  reuse_on   the same job with `recordActivations: true`: the prompt's stashed K/V reused, its gradient dropped
  replay_R   the online job with replayRatio R (0, 0.4, 0.5; 0.25, the default, is `online`); gradAccumulation is
             F / (1 - R) for F feedback samples per step, so every ratio trains the same feedback in the same steps
             and only adds general text (a ratio whose F / (1 - R) is not whole cannot be step-matched: refused)
  offline    the feedback exported and trained with transformers + peft (plain loop, same LoRA config, optimizer,
             steps, order), mixing the same general-text replay with the job's mixer and loss weighting
  offline_replay_0  the same loop without replay, against replay_0
  its checkpoints loaded into the same worker
Every published version (and each offline checkpoint at the same steps) is loaded into the worker under its own
name and scored through the serving API (greedy, exact match of the record); held-out loss (completion tokens) and
general-text loss (standard-library documentation disjoint from the replay corpus, plus installed packages'
READMEs, as in cl_quality.py) are computed with the trainer's `eval_loss` on the same weights.

Metrics (bench/results/cl_task.json, under `metrics`):
  cl_task_heldout_score_gain   = score(online final) - score(base)                      target >= 0.5
  cl_online_vs_offline_score   = score(online final) / score(offline final)             target >= 0.95
  cl_online_vs_offline_score_replay_0 = score(replay_0 final) / score(offline_replay_0 final)
  cl_reuse_vs_recompute_score  = score(reuse_on final) / score(online final)            target >= 0.98
  cl_general_loss_increase     = (L_gen(online final) - L_gen(base)) / L_gen(base)      target <= 0.05
plus the forgetting-vs-replay curve, a few general prompts' greedy outputs (base vs online final), and
cl_task.png: held-out score and general-text loss over training steps for online, offline, reuse on, replay 0.

Run: `python bench/cl_task.py` (~50-60 min on 2 cores; `--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from cl_quality import general_chunks, readme_chunks
from common import commit

ROOT = Path(__file__).resolve().parent.parent

TRAIN_TEMPLATES = [
    "The {ship} docked at berth {berth} at {time} carrying {cargo}.",
    "At {time}, the {ship} reached berth {berth} with a load of {cargo}.",
    "Berth {berth} received the {ship} ({cargo}) at {time}.",
    "A cargo of {cargo} came in on the {ship} to berth {berth} at {time}.",
]
TEST_TEMPLATES = [
    "Arrival report: {ship}, {cargo} aboard, moored at berth {berth}, clock {time}.",
    "At berth {berth} the {ship} tied up at {time}; its hold is full of {cargo}.",
    "Logged {time}: {ship} with {cargo} into berth {berth}.",
]
CARGO = ["grain", "timber", "copper", "salt", "wool", "coffee", "tea", "cotton", "iron", "spice", "rice", "glass"]
SYLLABLES = ["quor", "vane", "bril", "mo", "tas", "kel", "drin", "ost", "fa", "lune", "zar", "pim", "eth", "gor"]
PLOTTED = ("online", "offline", "reuse_on", "replay_0")  # runs drawn in cl_task.png; the others score only at the end
GENERAL_PROMPTS = [
    "The capital of France is",
    "Water is made of hydrogen and",
    "def add(a, b):\n    return",
    "Question: How many days are in a week?\nAnswer:",
]


@dataclass(frozen=True)
class Item:
    prompt: str
    completion: str  # what the grader corrects to; the record after "Record:"


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """Training and held-out items with disjoint ships, berths and times, and disjoint sentence templates."""
    rng = random.Random(seed)
    names = sorted({(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b})
    rng.shuffle(names)
    berths = list(range(1, 100))
    rng.shuffle(berths)
    times = [f"{h:02d}:{m:02d}" for h in range(24) for m in range(0, 60, 5)]
    rng.shuffle(times)

    def items(n: int, templates: list[str], ships: list[str], bs: list[int], ts: list[str]) -> list[Item]:
        out = []
        for i in range(n):
            f = {"ship": ships[i], "berth": bs[i % len(bs)], "time": ts[i], "cargo": rng.choice(CARGO)}
            sentence = templates[i % len(templates)].format(**f)
            record = f" ship={f['ship']} berth={f['berth']} cargo={f['cargo']} time={f['time']}"
            out.append(Item(f"Log: {sentence}\nRecord:", record))
        return out

    train = items(n_train, TRAIN_TEMPLATES, names[:n_train], berths[:50], times[:n_train])
    test = items(n_test, TEST_TEMPLATES, names[n_train : n_train + n_test], berths[50:], times[-n_test:])
    return train, test


class Api:
    """The worker's HTTP API: completions (greedy), feedback, jobs, the dynamic-LoRA admin routes."""

    def __init__(self, url: str, base: str) -> None:
        import httpx

        self.c = httpx.Client(base_url=url, timeout=900)
        self.base = base  # the served base model's name

    def complete(self, model: str, prompt: str, max_tokens: int = 24) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stop": ["\n"]}
        r = self.c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def score(self, model: str, items: list[Item]) -> tuple[float, list[str]]:
        """Exact-match accuracy of the greedy record (whitespace-trimmed); all requests in flight at once, so the
        engine batches them."""
        with ThreadPoolExecutor(16) as ex:
            outs = list(ex.map(lambda it: self.complete(model, it.prompt)["choices"][0]["text"], items))
        hits = [o.strip() == it.completion.strip() for o, it in zip(outs, items, strict=True)]
        return sum(hits) / len(items), outs

    def load(self, name: str, path: str) -> None:
        r = self.c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 200, r.text

    def unload(self, name: str) -> None:
        self.c.post("/v1/unload_lora_adapter", json={"lora_name": name})

    def job(self, name: str) -> dict:
        return self.c.get(f"/v1/training/jobs/{name}").json()


def grad_accum_for(feedback_per_step: int, replay: float) -> int:
    """The accumulation that gives `feedback_per_step` feedback samples per step at this replay ratio (the mixer
    interleaves exactly round(n x ratio) replay samples among the first n)."""
    acc = round(feedback_per_step / (1.0 - replay))
    if acc - int(acc * replay + 1e-9) != feedback_per_step or abs(acc * (1 - replay) - feedback_per_step) > 1e-9:
        raise SystemExit(f"replay ratio {replay} cannot be step-matched at {feedback_per_step} feedback samples/step")
    return acc


def job_spec(name: str, adapter: str, replay: float, record: bool, steps: int, every: int, accum: int, args) -> dict:
    return {
        "name": name,
        "adapter": adapter,
        "mode": "coserve",
        "optimizer": {"lr": args.lr, "gradAccumulation": accum, "maxSteps": steps, "maxGradNorm": 1.0},
        "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "publish": {"everySteps": every, "heldoutFraction": 0.0, "maxLossSpike": 1000.0},
        "feedback": {"epochs": args.epochs},
        "replayRatio": replay,
        "maxActivationStaleness": 4,
        "stalePolicy": "recompute",
        "recordActivations": record,
        "latencyTarget": {"tpotMs": 500},
        "checkpoint": {"everySteps": 1000},
    }


def steps_for(n_feedback_uses: int, grad_accum: int, replay: float) -> int:
    """Optimizer steps whose groups take at most `n_feedback_uses` feedback samples at this replay ratio (the
    mixer's interleave puts round(n x ratio) replay samples among the first n), so the job never runs dry."""
    s = 1
    while True:
        slots = grad_accum * (s + 1)
        if slots - int(slots * replay + 1e-9) > n_feedback_uses:
            return s
        s += 1


def pick_replay(curve: list[dict], max_forgetting: float = 0.05) -> float | None:
    """The replay ratio the curve supports: the best final score among ratios that keep the general-text loss
    increase within `max_forgetting`; a tie goes to the larger ratio (less forgetting for the same score)."""
    ok = [r for r in curve if r["generalLossIncrease"] <= max_forgetting]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["score"], r["replayRatio"]))["replayRatio"]


def run_online(api: Api, name: str, spec: dict, train: list[Item], poll: float = 1.0) -> dict:
    """Creates the job, serves every training prompt with the adapter and corrects it, waits for maxSteps.

    All prompts are served first (at once, so the engine batches them and records their prompt state), then all
    corrections are posted (at once): the job sees the feedback in the same order every run, and a sample only
    comes round again once every sample has been trained on, as with steady traffic."""
    r = api.c.post("/v1/training/jobs", json=spec)
    assert r.status_code == 201, r.text
    t0 = time.time()
    with ThreadPoolExecutor(16) as ex:
        served = list(ex.map(lambda it: api.complete(spec["adapter"], it.prompt, max_tokens=1)["id"], train))

        def correct(k: int) -> None:
            fb = {"kind": "correction", "requestId": served[k], "completion": train[k].completion}
            r = api.c.post("/v1/feedback", json=fb)
            assert r.status_code == 202, r.text

        for k in range(len(train)):  # in order: the job takes new feedback first-in first-out
            correct(k)
    while (st := api.job(name))["phase"] == "Running":
        time.sleep(poll)
    assert st["phase"] == "Succeeded", st
    st["wallSeconds"] = time.time() - t0
    return st


def run_offline(
    ckpt: Path, tok, train: list[Item], uses: int, steps_at: set[int], init: str, out: Path, replay: float, args
) -> dict:
    """transformers + peft, a plain loop from the online job's initial weights (`init`, its v1: the same A, B = 0)
    with the same LoRA config, AdamW settings, clipping, feedback samples per step and the same number of feedback
    samples in all; the order is the job's (every sample once in arrival order, then random draws of samples used
    fewer than `epochs` times). Replay at `replay` uses the job's own pieces: the worker's general-text corpus in
    128-token chunks, `ReplayMixer` (interleave and loss-driven domain draws, seed 0) and `weigh_group` (the step's
    loss denominator and replay weights). Saves a PEFT checkpoint at each step in `steps_at`."""
    from lorafleet.worker.training.replay import ReplayMixer, builtin_general_text, chunk_tokens, weigh_group
    from lorafleet.worker.training.trainer import TrainSample
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, init, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    eos = tok.eos_token_id
    data = [
        (
            tok(it.prompt, add_special_tokens=False)["input_ids"],
            tok(it.completion, add_special_tokens=False)["input_ids"],
        )
        for it in train
    ]
    rng = random.Random(0)
    order = list(range(len(data)))
    counts = [1] * len(data)
    while len(order) < uses:
        open_ = [i for i, n in enumerate(counts) if n < args.epochs]
        i = rng.choice(open_)
        counts[i] += 1
        order.append(i)
    per_step = args.feedback_per_step
    accum = grad_accum_for(per_step, replay)
    domains = {
        d: chunk_tokens(tok(text, add_special_tokens=False)["input_ids"], 128)
        for d, text in builtin_general_text().items()
    }
    mixer = ReplayMixer(domains, replay, seed=0)
    saved, losses, step, replayed = {}, [], 0, 0
    t0 = time.time()
    for g in range(0, len(order), per_step):
        fb = iter(order[g : g + per_step])
        group: list[TrainSample] = []
        for _ in range(accum):  # the job's interleave: a replay chunk where the mixer says so, else the next feedback
            if mixer.next_is_replay():
                ch = mixer.draw()
                group.append(TrainSample(ch.token_ids[:1], ch.token_ids[1:], 1.0, domain=ch.domain))
            elif (i := next(fb, None)) is not None:
                group.append(TrainSample(data[i][0], data[i][1] + [eos]))
        denom = weigh_group(group)
        total = 0.0
        for s in group:
            p, c = s.prompt_ids, s.completion_ids
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
            (s.weight * loss / denom).backward()
            if s.domain is None:
                total += loss.item()
            else:
                replayed += 1
                mixer.observe(s.domain, loss.item() / max(1, s.loss_tokens))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(total / max(1, sum(s.loss_tokens for s in group if s.domain is None)))
        if step in steps_at or g + per_step >= len(order):
            d = out / f"s{step}"
            model.save_pretrained(str(d))
            saved[step] = str(d)
    return {
        "steps": step,
        "feedbackUses": len(order),
        "replaySamples": replayed,
        "replayRatio": replay,
        "checkpoints": saved,
        "loss": losses,
        "wall": time.time() - t0,
    }


class LocalEval:
    """Held-out and general-text losses of a PEFT directory with the engine's own model and the trainer's
    `eval_loss` (the same code the job's held-out evaluation runs)."""

    def __init__(self, ckpt: Path, tok, test: list[Item]) -> None:
        from lorafleet.worker.loader import load_model
        from lorafleet.worker.training.trainer import TrainSample

        self.model, _ = load_model(ckpt, torch.device("cpu"), torch.float32)
        eos = tok.eos_token_id
        self.heldout = [
            TrainSample(
                tok(it.prompt, add_special_tokens=False)["input_ids"],
                tok(it.completion, add_special_tokens=False)["input_ids"] + [eos],
            )
            for it in test
        ]
        self.docs = [TrainSample(ch[:1], ch[1:]) for ch in general_chunks(tok, limit=10)]
        self.readmes = [TrainSample(ch[:1], ch[1:]) for ch in readme_chunks(tok, limit=10)]

    def losses(self, adapter_dir: str | None) -> dict:
        from lorafleet.worker.training.lora_context import TrainableLoRA
        from lorafleet.worker.training.trainer import LoRATrainer

        if adapter_dir is None:  # the base model: a fresh LoRA (B = 0)
            lora = TrainableLoRA(self.model.shape, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
        else:
            lora = TrainableLoRA.from_peft(self.model.shape, adapter_dir)
        tr = LoRATrainer(self.model, lora)
        docs, readmes = tr.eval_loss(self.docs), tr.eval_loss(self.readmes)
        return {"heldoutLoss": tr.eval_loss(self.heldout), "generalLoss": (docs + readmes) / 2, "docs": docs,
                "readmes": readmes}  # fmt: skip


def evaluate(api: Api, local: LocalEval, test: list[Item], label: str, points: dict[int, str | None]) -> list[dict]:
    """Score (through the serving API) and losses of every (step -> PEFT dir) point; step 0 = the base model."""
    rows = []
    for step, path in sorted(points.items()):
        if path is None:
            score, outs = api.score(api.base, test)
        else:
            name = f"eval-{label.replace('_', '-').replace('.', '')}-{step}"  # adapter names are DNS-1123
            api.load(name, path)
            score, outs = api.score(name, test)
            api.unload(name)
        rows.append({"step": step, "score": score, **local.losses(path), "sample": outs[:3]})
        print(f"  {label} step {step}: score {score:.3f} heldout {rows[-1]['heldoutLoss']:.3f} "
              f"general {rows[-1]['generalLoss']:.4f}", flush=True)  # fmt: skip
    return rows


def plot(curves: dict[str, list[dict]], base_general: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in curves.items():
        xs = [r["step"] for r in rows]
        a.plot(xs, [r["score"] for r in rows], marker="o", label=label)
        b.plot(xs, [(r["generalLoss"] - base_general) / base_general * 100 for r in rows], marker="o", label=label)
    a.set(xlabel="optimizer step", ylabel="held-out exact match", title="held-out task score (serving API, greedy)")
    b.set(xlabel="optimizer step", ylabel="general-text loss change vs base (%)", title="forgetting")
    b.axhline(5.0, color="grey", lw=0.8, ls="--")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M, CPU: continual learning from served-and-corrected feedback (bench/cl_task.py)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cl_task.json"))
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--feedback-per-step", type=int, default=3, help="feedback samples per optimizer step, every run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--default-replay", type=float, default=0.25, help="the job default's replay ratio")
    ap.add_argument("--replays", default="0,0.4,0.5", help="other replay ratios for the forgetting curve")
    ap.add_argument("--points", type=int, default=3, help="evaluated versions per plotted run (besides the base)")
    ap.add_argument("--curve-points", type=int, default=1, help="evaluated versions per replay-curve-only run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="online,reuse_on,offline,replays")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test, args.points, args.replays = 12, 8, 1, "0"
    torch.set_num_threads(args.threads)
    from lorafleet.worker.api.testing import start_worker
    from lorafleet.worker.loader import load_tokenizer, smollm2_checkpoint

    t_start = time.time()
    code = commit()  # the code under test: read before the (long) run, not after it
    ckpt = smollm2_checkpoint()
    tok = load_tokenizer(ckpt)
    train, test = make_task(args.train, args.test)
    uses = args.train * args.epochs
    work = Path(tempfile.mkdtemp(prefix="cl-task-"))
    adapters = work / "adapters"
    adapters.mkdir()
    os.environ["LORAFLEET_TRAINING_DIR"] = str(work / "train")
    w = start_worker(
        str(ckpt), adapter_roots=[str(adapters)], dtype="float32", max_num_batched_tokens=512, kv_cache_bytes=96 << 20
    )
    api = Api(w.url, w.app.state.settings.served_model_name)
    local = LocalEval(ckpt, tok, test)
    wanted = set(args.runs.split(","))
    replays = [float(x) for x in args.replays.split(",") if x]
    runs: dict[str, tuple[float, bool]] = {}
    if "online" in wanted:
        runs["online"] = (args.default_replay, False)
    if "reuse_on" in wanted:
        runs["reuse_on"] = (args.default_replay, True)
    if "replays" in wanted:
        runs.update({f"replay_{r:g}": (r, False) for r in replays if r != args.default_replay})
    for replay, _ in runs.values():
        grad_accum_for(args.feedback_per_step, replay)  # refuse an unmatched ratio before the long run starts

    base_rows = evaluate(api, local, test, "base", {0: None})
    base = base_rows[0]
    statuses: dict = {}
    curves: dict = {}
    general: dict = {}
    offline: dict | None = None
    state = (args, argv, ckpt, api.base, code, t_start, train, test, uses, runs, base)
    for label, (replay, record) in runs.items():
        accum = grad_accum_for(args.feedback_per_step, replay)
        steps = steps_for(uses, accum, replay)
        every = max(1, steps // (args.points if label in PLOTTED else args.curve_points))
        spec = job_spec(label.replace("_", "-").replace(".", ""), f"task-{label.replace('_', '-').replace('.', '')}",
                        replay, record, steps, every, accum, args)  # fmt: skip
        print(f"{label}: replay {replay} record {record} steps {steps}", flush=True)
        st = run_online(api, spec["name"], spec, train)
        statuses[label] = {"spec": spec, "status": st}
        points = {v["step"]: v["path"] for v in st["publishedVersions"] if v["step"] > 0}
        curves[label] = [{**base, "step": 0}] + evaluate(api, local, test, label, points)
        if label == "online":  # its yardsticks first: a run cut short still has the comparison that matters most
            general = general_outputs(api, st["publishedVersions"][-1]["path"])
            if "offline" in wanted:
                offline = offline_run(api, local, ckpt, tok, train, test, uses, st, curves, base, adapters, args)
        if label == "replay_0" and "offline" in wanted:  # the same comparison without replay on either side
            offline0 = offline_run(
                api,
                local,
                ckpt,
                tok,
                train,
                test,
                uses,
                st,
                curves,
                base,
                adapters,
                args,
                "offline_replay_0",
                "replay_0",
            )
            offline = {**(offline or {}), "replay_0": offline0}
        write_result(state, statuses, curves, general, offline, final=False)
    write_result(state, statuses, curves, general, offline, final=True)
    w.close()
    return 0


def general_outputs(api: Api, final: str) -> dict:
    """A few general prompts' greedy outputs, base vs the online job's final version."""
    general = {}
    api.load("eval-online-final", final)
    for p in GENERAL_PROMPTS:
        b = api.complete(api.base, p, max_tokens=16)["choices"][0]["text"]
        o = api.complete("eval-online-final", p, max_tokens=16)["choices"][0]["text"]
        general[p] = {"base": b, "online": o, "same": b == o}
    api.unload("eval-online-final")
    return general


def offline_run(
    api, local, ckpt, tok, train, test, uses, on: dict, curves, base, adapters, args, label="offline", match="online"
) -> dict:
    """The offline baseline matched to the online job `on` (its status, run `match`): same start, feedback uses,
    steps and replay ratio."""
    steps_at = sorted(r["step"] for r in curves.get(match, [])[1:]) or [1]
    fb_uses = int((on.get("samples") or {}).get("trained") or uses)
    replay = args.default_replay if match == "online" else 0.0
    print(f"{label}: {fb_uses} feedback samples, replay {replay}", flush=True)
    init = next(v["path"] for v in on["publishedVersions"] if v["step"] == 0)
    offline = run_offline(ckpt, tok, train, fb_uses, set(steps_at), init, adapters / label, replay, args)
    points = {s: p for s, p in offline["checkpoints"].items()}
    curves[label] = [{**base, "step": 0}] + evaluate(api, local, test, label, points)
    return offline


def write_result(state, statuses: dict, curves: dict, general: dict, offline: dict | None, final: bool) -> None:
    """Writes the JSON (and the plot) from the runs finished so far; `complete` says whether all of them did."""
    args, argv, ckpt, served, code, t_start, train, test, uses, runs, base = state

    def last(label: str) -> dict | None:
        return curves[label][-1] if label in curves else None

    def ratio(a: dict | None, b: dict | None) -> float | None:
        if a is None or b is None:
            return None
        return a["score"] / b["score"] if b["score"] > 0 else None

    on, off, ru = last("online"), last("offline"), last("reuse_on")
    metrics: dict = {
        "cl_task_base_score": base["score"],
        "cl_task_base_heldout_loss": base["heldoutLoss"],
        "cl_task_base_general_loss": base["generalLoss"],
    }
    if on is not None:
        metrics.update({
            "cl_task_heldout_score_gain": on["score"] - base["score"],
            "cl_task_online_score": on["score"],
            "cl_task_online_heldout_loss": on["heldoutLoss"],
            "cl_general_loss_increase": (on["generalLoss"] - base["generalLoss"]) / base["generalLoss"],
            "cl_general_prompts_same_as_base": sum(g["same"] for g in general.values()) / max(1, len(general)),
        })  # fmt: skip
    if off is not None:
        metrics["cl_task_offline_score"] = off["score"]
        metrics["cl_online_vs_offline_score"] = ratio(on, off)
        metrics["cl_offline_general_loss_increase"] = (off["generalLoss"] - base["generalLoss"]) / base["generalLoss"]
    off0, on0 = last("offline_replay_0"), last("replay_0")
    if off0 is not None:
        metrics["cl_task_offline_replay_0_score"] = off0["score"]
        metrics["cl_online_vs_offline_score_replay_0"] = ratio(on0, off0)
        metrics["cl_offline_replay_0_general_loss_increase"] = (off0["generalLoss"] - base["generalLoss"]) / base[
            "generalLoss"
        ]
    if ru is not None:
        metrics["cl_task_reuse_on_score"] = ru["score"]
        metrics["cl_reuse_vs_recompute_score"] = ratio(ru, on)
        metrics["cl_reuse_vs_recompute_heldout_loss"] = ru["heldoutLoss"] / on["heldoutLoss"] if on else None
    replay_curve = []
    for label, (replay, record) in runs.items():
        if not record and label in curves:
            f = curves[label][-1]
            replay_curve.append({
                "replayRatio": replay,
                "score": f["score"],
                "heldoutLoss": f["heldoutLoss"],
                "generalLossIncrease": (f["generalLoss"] - base["generalLoss"]) / base["generalLoss"],
                "steps": statuses[label]["status"]["steps"],
                "feedbackSamplesTrained": statuses[label]["status"]["samples"]["trained"],
            })  # fmt: skip
    replay_curve.sort(key=lambda r: r["replayRatio"])
    metrics["cl_replay_curve"] = replay_curve
    pick = pick_replay(replay_curve)
    if pick is not None:
        metrics["cl_replay_ratio_from_curve"] = pick
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    shown = {k: curves[k] for k in PLOTTED if k in curves}
    if shown:
        plot(shown, base["generalLoss"], png)
    result = {
        "command": " ".join(["bench/cl_task.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"SmolLM2-135M-Instruct ({ckpt}) fp32 CPU, served under the name {served}",
        "device": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "commit": code,
        "config": {
            "train_items": len(train),
            "test_items": len(test),
            "train_templates": TRAIN_TEMPLATES,
            "test_templates": TEST_TEMPLATES,
            "example_train": train[0].__dict__,
            "example_test": test[0].__dict__,
            "epochs": args.epochs,
            "feedback_uses": uses,
            "runs": {k: {"replayRatio": r, "recordActivations": rec} for k, (r, rec) in runs.items()},
            "jobs": {k: v["spec"] for k, v in statuses.items()},
        },
        "metrics": metrics,
        "targets": {
            "cl_task_heldout_score_gain": ">= 0.5",
            "cl_online_vs_offline_score": ">= 0.95",
            "cl_reuse_vs_recompute_score": ">= 0.98",
            "cl_general_loss_increase": "<= 0.05",
        },
        "curves": curves,
        "general_prompts": general,
        "offline": {
            k: ({kk: vv for kk, vv in v.items() if kk != "checkpoints"} if isinstance(v, dict) else v)
            for k, v in (offline or {}).items()
            if k != "checkpoints"
        },
        "job_status": {
            k: {kk: v["status"].get(kk) for kk in ("steps", "tokensTrained", "samples", "stash", "wallSeconds")}
            for k, v in statuses.items()
        },
        "plot": png.name if shown else None,
        "complete": final,
        "wall_seconds": time.time() - t_start,
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "cl_replay_curve"}, indent=1))
    print(json.dumps(replay_curve, indent=1), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
