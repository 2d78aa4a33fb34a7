"""Durable training checkpoints: everything a job needs so that training after a crash is the training that would
have happened without it.

Why more than the published version: a version holds only the LoRA weights. Resuming from it alone restarts AdamW
(zero moments, step 1 bias correction), the step/token counters and the data order (replay mixer credit and RNG,
which feedback was already used), so the resumed run drifts from the uninterrupted one. A checkpoint holds:
  - `tensors.safetensors`: LoRA masters (`lora.<param name>`), AdamW state per parameter name
    (`opt.<param name>.<exp_avg|exp_avg_sq|step>`) and RNG states as uint8 tensors (`rng.<name>`);
  - `state.json`: scalars (step, counters, replay mixer, publisher, data position) and the SHA-256 + size of the
    tensor file, written last.
Atomicity: both files go into a fresh temp directory, each is fsynced, the directory is renamed to
`step-<8 digits>` and the parent fsynced, so a crash leaves either the whole checkpoint or a `.tmp-*` directory
that `load_latest` ignores (and removes). A checkpoint whose manifest does not parse, whose tensor file is missing,
has the wrong size or hash, or does not load is reported as corrupt and the next older one is tried.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lorafleet.worker.durable import fsync_path, replace_durably, write_synced
from lorafleet.worker.lora.sources.verify import sha256_file
from lorafleet.worker.paths import within

FORMAT = 1
TENSORS = "tensors.safetensors"
MANIFEST = "state.json"


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict


@dataclass
class LoadResult:
    checkpoint: Checkpoint | None
    corrupt: list[dict] = field(default_factory=list)  # {"path", "step", "reason"}, newest first


class CheckpointStore:
    """The checkpoints of one adapter's job in `root`, newest kept `keep` deep."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)

    def steps(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.root.glob("step-*"):
            tail = p.name[len("step-") :]
            if tail.isdigit() and p.is_dir():
                out.append((int(tail), p))
        return sorted(out)

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Writes one checkpoint atomically (temp dir, fsync files, rename, fsync parent) and prunes old ones."""
        from safetensors.torch import save_file

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-{step:08d}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            tfile = tmp / TENSORS
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tfile))
            fsync_path(tfile)
            meta = {"file": TENSORS, "bytes": tfile.stat().st_size, "sha256": sha256_file(tfile)}
            manifest = {"format": FORMAT, "step": step, "tensors": meta, "state": state}
            write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
            fsync_path(tmp)
            if final.exists():  # same step again (a redone step after a restart): replace it
                shutil.rmtree(final)
            replace_durably(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in self.steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read(path: Path) -> Checkpoint:
        """Loads and verifies one checkpoint directory; raises ValueError saying what is wrong."""
        from safetensors.torch import load_file

        try:
            manifest = json.loads(within(path, path / MANIFEST).read_text())  # PathEscape is a ValueError
        except FileNotFoundError as exc:
            raise ValueError("manifest state.json missing") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest does not parse: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(
                f"unknown checkpoint format {manifest.get('format') if isinstance(manifest, dict) else '?'}"
            )
        meta = manifest.get("tensors") or {}
        tfile = within(path, path / str(meta.get("file", TENSORS)))  # a manifest cannot point out of its directory
        if not tfile.exists():
            raise ValueError("tensor file missing")
        size = tfile.stat().st_size
        if size != meta.get("bytes"):
            raise ValueError(f"tensor file has {size} bytes, manifest says {meta.get('bytes')}")
        if sha256_file(tfile) != meta.get("sha256"):
            raise ValueError("tensor file SHA-256 mismatch")
        try:
            tensors = load_file(str(tfile))
        except Exception as exc:  # noqa: BLE001 - any loader failure means the file is unusable
            raise ValueError(f"tensor file does not load: {exc}") from exc
        return Checkpoint(path, int(manifest["step"]), tensors, dict(manifest.get("state") or {}))

    def load_latest(self, accept: Callable[[Checkpoint], None] | None = None) -> LoadResult:
        """The newest checkpoint that verifies (and that `accept` does not reject with ValueError, e.g. tensor shapes
        that do not fit the job); corrupt newer ones are reported."""
        for p in self.root.glob(".tmp-*"):  # a write the process did not live to rename
            shutil.rmtree(p, ignore_errors=True)
        res = LoadResult(None)
        for step, p in reversed(self.steps()):
            try:
                ck = self.read(within(self.root, p))  # a step directory that links out of the store is refused
                if accept is not None:
                    accept(ck)
                res.checkpoint = ck
                return res
            except ValueError as exc:
                res.corrupt.append({"path": str(p), "step": step, "reason": str(exc)})
        return res

    def discard(self, path: Path) -> None:
        """Moves a corrupt checkpoint aside (kept for inspection, never tried again)."""
        target = path.with_name(f"corrupt-{path.name}-{time.time_ns()}")
        try:
            os.replace(path, target)
        except OSError:
            pass


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """The optimizer's `state_dict()` state keyed by parameter name, not position (`opt.<name>.<key>`)."""
    state = opt.state_dict()["state"]
    return {
        f"opt.{name}.{key}": v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        for i, name in enumerate(names)
        for key, v in state.get(i, {}).items()
    }


def restore_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors` through `load_state_dict`, which puts each state tensor on its parameter's
    device and dtype; the hyperparameters stay the spec's. Shapes are checked where a checkpoint is accepted
    (`lifecycle.lora_from_checkpoint`)."""
    state = {
        i: {k[len(f"opt.{n}.") :]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        for i, n in enumerate(names)
    }
    opt.load_state_dict({**opt.state_dict(), "state": {i: st for i, st in state.items() if st}})
