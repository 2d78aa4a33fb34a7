"""A minimal continuous-batching driver over `BenchLlama` for the throughput benchmarks.

What it models (and what it does not): requests are admitted FIFO while the batch has room and the KV pool has
blocks for prompt + output (reserved up front, so no preemption); each iteration prefills the newly admitted
requests (admission waits until max_bs/8 rows are free, so prefills come in groups) (flat, up to a token budget, LoRA segments sorted by slot) and then runs one decode step for every running
request through a CUDA graph padded to the next captured batch size. Adapters live in GPU slots; when more adapters
are registered than slots, a missing one is copied from pinned host memory on a side stream into a free (or least
recently used, unpinned) slot; the main stream waits on that copy's event only. Outputs run to their planned length
(no EOS), so every engine configuration generates exactly the same tokens. There is no host sync per step: next
tokens stay on the GPU and feed the next step through a gather.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from lorafleet.worker.engine.cuda_graph import EDGE, CudaGraphRunner, InputSpec

SPECS = [
    InputSpec("input_ids", 0, 0),
    InputSpec("positions", 0, 0),
    InputSpec("slot_mapping", 0, 0),
    InputSpec("block_table", 0, 0),
    InputSpec("seq_lens", 0, 0),
    InputSpec("q_indptr", 1, EDGE),
    InputSpec("seg_indptr", 1, EDGE),
    InputSpec("seg_slots", 0, -1),
]


@dataclass
class Req:
    rid: int
    plen: int
    olen: int
    adapter: int  # -1 = base model
    blocks: list[int] = field(default_factory=list)
    slot: int = -1
    pos: int = 0  # tokens in the KV cache
    done: int = 0  # tokens generated
    t_first: float = 0.0


def decode_example(bs: int, max_blocks: int, page: int, ctx: int, slots: list[int], dev) -> dict[str, torch.Tensor]:
    """Decode inputs for `bs` sequences of `ctx` tokens each (blocks laid out consecutively from block 1), tokens
    sorted by slot; used for graph capture and for the fixed-batch step benchmarks."""
    nb = (ctx + page - 1) // page
    bt = np.zeros((bs, max_blocks), dtype=np.int32)
    for i in range(bs):
        bt[i, :nb] = 1 + i * nb + np.arange(nb)
    pos = np.full(bs, ctx - 1, dtype=np.int64)
    slot_map = bt[np.arange(bs), pos // page].astype(np.int64) * page + pos % page
    slots_sorted = sorted(slots)
    seg_indptr, seg_slots = segments(slots_sorted)
    return {
        "input_ids": torch.randint(0, 1000, (bs,), device=dev),
        "positions": torch.from_numpy(pos).to(dev),
        "slot_mapping": torch.from_numpy(slot_map).to(dev),
        "block_table": torch.from_numpy(bt).to(dev),
        "seq_lens": torch.full((bs,), ctx, dtype=torch.int32, device=dev),
        "q_indptr": torch.arange(bs + 1, dtype=torch.int32, device=dev),
        "seg_indptr": torch.from_numpy(seg_indptr).to(dev),
        "seg_slots": torch.from_numpy(seg_slots).to(dev),
    }


def segments(token_slots: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run-length segments of an already slot-sorted token list -> (seg_indptr int32, seg_slots int32)."""
    a = np.asarray(token_slots, dtype=np.int32)
    if a.size == 0:
        return np.zeros(1, np.int32), np.zeros(0, np.int32)
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    indptr = np.r_[starts, a.size].astype(np.int32)
    return indptr, a[starts].astype(np.int32)


class Sim:
    def __init__(
        self,
        model,
        max_bs: int,
        graph_sizes: list[int],
        use_lora: bool,
        max_len: int,
        host_store: dict[str, torch.Tensor] | None = None,
        prefill_budget: int = 8192,
        admit_min: int | None = None,
    ) -> None:
        self.m, self.max_bs, self.use_lora = model, max_bs, use_lora
        self.page = model.page
        self.max_blocks = (max_len + self.page - 1) // self.page
        self.num_blocks = model.k_cache[0].shape[0]
        self.free = deque(range(1, self.num_blocks))  # block 0: scratch for padded rows
        self.host = host_store
        self.prefill_budget = prefill_budget
        self.admit_min = admit_min if admit_min is not None else max(1, max_bs // 8)
        self.dev = torch.device("cuda")
        self.copy_stream = torch.cuda.Stream()
        self.slot_of: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident slots with no running request
        self.pins = [0] * max(model.num_slots, 1)
        self.slot_owner = [-1] * max(model.num_slots, 1)
        self.loads = 0
        self.slot_free_evt: dict[int, torch.cuda.Event] = {}
        for s in range(model.num_slots):
            if host_store is None:  # adapters 0..S-1 preloaded in slots 0..S-1
                self.slot_of[s] = s
                self.slot_owner[s] = s
            self.lru[s] = None
        ex_slots = list(range(min(max(graph_sizes), max(model.num_slots, 1))))
        self.graph = CudaGraphRunner(
            lambda inp: model.forward(inp, 1, use_lora, last_only=False),
            SPECS,
            graph_sizes,
            lambda bs: decode_example(
                bs, self.max_blocks, self.page, 8, [ex_slots[i % len(ex_slots)] for i in range(bs)], self.dev
            ),
        )
        self.last_tok = torch.zeros(1 << 20, dtype=torch.int64, device=self.dev)

    # --- adapters -------------------------------------------------------------------------------------------
    def _acquire(self, adapter: int) -> int | None:
        if adapter < 0 or not self.use_lora:
            return -1
        s = self.slot_of.get(adapter)
        if s is None:
            if self.host is None:
                raise KeyError(adapter)
            if self.lru:
                s, _ = self.lru.popitem(last=False)
                if self.slot_owner[s] >= 0:
                    del self.slot_of[self.slot_owner[s]]
            else:
                return None
            evt = self.slot_free_evt.pop(s, None)
            if evt is not None:  # steps already queued may still read the evicted adapter
                self.copy_stream.wait_event(evt)
            with torch.cuda.stream(self.copy_stream):
                for name, dst in self.m.lora.items():
                    dst[s].copy_(self.host[name][adapter], non_blocking=True)
            torch.cuda.current_stream().wait_stream(self.copy_stream)
            self.slot_of[adapter] = s
            self.slot_owner[s] = adapter
            self.loads += 1
        else:
            self.lru.pop(s, None)
        self.pins[s] += 1
        return s

    def _release(self, s: int) -> None:
        if s < 0:
            return
        self.pins[s] -= 1
        if self.pins[s] == 0:
            self.lru[s] = None
            evt = torch.cuda.Event()
            evt.record()
            self.slot_free_evt[s] = evt

    # --- steps ----------------------------------------------------------------------------------------------
    def _prefill(self, new: list[Req]) -> None:
        new.sort(key=lambda r: r.slot)
        lens = np.array([r.plen for r in new])
        q_indptr = np.r_[0, np.cumsum(lens)].astype(np.int32)
        t = int(q_indptr[-1])
        pos = np.concatenate([np.arange(n) for n in lens])
        bt = np.zeros((len(new), self.max_blocks), dtype=np.int32)
        for i, r in enumerate(new):
            bt[i, : len(r.blocks)] = r.blocks
        row = np.repeat(np.arange(len(new)), lens)
        slot_map = bt[row, pos // self.page].astype(np.int64) * self.page + pos % self.page
        seg_indptr, seg_slots = segments(np.repeat([r.slot for r in new], lens))
        inp = {
            "input_ids": torch.randint(0, 1000, (t,), device=self.dev),
            "positions": torch.from_numpy(pos).to(self.dev),
            "slot_mapping": torch.from_numpy(slot_map).to(self.dev),
            "block_table": torch.from_numpy(bt).to(self.dev),
            "seq_lens": torch.from_numpy(lens.astype(np.int32)).to(self.dev),
            "q_indptr": torch.from_numpy(q_indptr).to(self.dev),
            "seg_indptr": torch.from_numpy(seg_indptr).to(self.dev),
            "seg_slots": torch.from_numpy(seg_slots).to(self.dev),
        }
        nxt = self.m.forward(inp, int(lens.max()), self.use_lora, last_only=True)
        ids = torch.tensor([r.rid for r in new], device=self.dev)
        self.last_tok[ids] = nxt
        for r in new:
            r.pos = r.plen
            r.done = 1

    def _rebuild(self, running: list[Req]) -> None:
        running.sort(key=lambda r: r.slot)
        n = len(running)
        self.ids = torch.tensor([r.rid for r in running], device=self.dev)
        self.bt = np.zeros((n, self.max_blocks), dtype=np.int32)
        for i, r in enumerate(running):
            self.bt[i, : len(r.blocks)] = r.blocks
        self.bt_dev = torch.from_numpy(self.bt).to(self.dev)
        seg_indptr, seg_slots = segments([r.slot for r in running])
        self.seg_dev = (torch.from_numpy(seg_indptr).to(self.dev), torch.from_numpy(seg_slots).to(self.dev))
        self.q_indptr = torch.arange(n + 1, dtype=torch.int32, device=self.dev)

    def _decode(self, running: list[Req]) -> None:
        n = len(running)
        pos = np.fromiter((r.pos for r in running), dtype=np.int64, count=n)
        slot_map = self.bt[np.arange(n), pos // self.page].astype(np.int64) * self.page + pos % self.page
        packed = torch.from_numpy(np.concatenate([pos, slot_map, pos + 1])).to(self.dev)
        inp = {
            "input_ids": self.last_tok[self.ids],
            "positions": packed[:n],
            "slot_mapping": packed[n : 2 * n],
            "block_table": self.bt_dev,
            "seq_lens": packed[2 * n :],
            "q_indptr": self.q_indptr,
            "seg_indptr": self.seg_dev[0],
            "seg_slots": self.seg_dev[1],
        }
        nxt = self.graph(inp, n)
        self.last_tok[self.ids] = nxt
        for r in running:
            r.pos += 1
            r.done += 1

    def run(self, reqs: list[Req]) -> dict:
        """Serve all requests; returns generated tokens, wall time and iteration counts."""
        waiting = deque(reqs)
        running: list[Req] = []
        steps = prefills = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while waiting or running:
            new: list[Req] = []
            budget = self.prefill_budget
            # admit in groups (or when idle): each prefill is an eager forward whose launch overhead (~0.05 s on
            # an 8B model) would otherwise be paid once per finished request
            room = self.max_bs - len(running)
            if running and room < self.admit_min:
                waiting_ok = False
            else:
                waiting_ok = True
            while waiting_ok and waiting and len(running) + len(new) < self.max_bs:
                r = waiting[0]
                need = (r.plen + r.olen + self.page - 1) // self.page
                if need > len(self.free) or (new and r.plen > budget):
                    break
                s = self._acquire(r.adapter)
                if s is None:
                    break
                waiting.popleft()
                r.slot = s
                r.blocks = [self.free.popleft() for _ in range(need)]
                budget -= r.plen
                new.append(r)
            if new:
                self._prefill(new)
                prefills += 1
                running += new
                self._rebuild(running)
            if running:
                self._decode(running)
                steps += 1
                fin = [r for r in running if r.done >= r.olen]
                if fin:
                    for r in fin:
                        self.free.extend(r.blocks)
                        self._release(r.slot)
                    running = [r for r in running if r.done < r.olen]
                    if running:
                        self._rebuild(running)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        toks = sum(r.olen for r in reqs)
        return {
            "requests": len(reqs),
            "output_tokens": toks,
            "prompt_tokens": sum(r.plen for r in reqs),
            "wall_s": wall,
            "tokens_per_s": toks / wall,
            "decode_steps": steps,
            "prefill_iterations": prefills,
            "adapter_loads": self.loads,
        }


def make_requests(n: int, mix: str, n_adapters: int, seed: int, max_len: int) -> list[Req]:
    """decode-heavy: prompts 64-192, outputs 192-320. sharegpt-like: log-normal prompts (median ~180) and outputs
    (median ~150), clipped; adapters drawn uniformly (n_adapters=0: base model)."""
    rng = np.random.default_rng(seed)
    if mix == "decode_heavy":
        p = rng.integers(64, 193, n)
        o = rng.integers(192, 321, n)
    else:
        p = np.clip(rng.lognormal(np.log(180), 0.9, n), 8, 1024).astype(int)
        o = np.clip(rng.lognormal(np.log(150), 0.8, n), 4, 512).astype(int)
    o = np.minimum(o, max_len - p - 1)
    a = rng.integers(0, n_adapters, n) if n_adapters else np.full(n, -1)
    return [Req(i, int(p[i]), int(o[i]), int(a[i])) for i in range(n)]
