"""LLMEngine: the single-threaded serving loop (add_request / step / abort) over model, KV cache and adapters.

Why single-threaded: every mutation of scheduler, block manager and adapter store happens inside `step()` or the
calls around it on one thread, so none of them needs locks; the HTTP layer feeds the engine through queues.
Work that rides the loop (co-serving fine-tuning) joins through one typed seam, `IterationPlugin` (plugin.py):
`add_plugin` attaches it, and each step calls it back after its kernels are queued (asynchronous CUDA-graph pieces
run while the host settles the step) and once the step is settled (eager pieces, within the leftover budget).

Why async scheduling (`EngineConfig.async_scheduling`, vLLM-style): synchronously, each step launches the forward,
waits for the sampled tokens, then appends them, checks stops, detokenizes and schedules the next step while the GPU
idles. With the flag, step N is launched *before* step N-1's tokens reach the host: every sequence that sampled at
N-1 gets a PLACEHOLDER token, the scheduler plans N as usual, and the runner reads those inputs from N-1's tokens on
the device; then N-1's bookkeeping runs while N computes, and its outputs are returned one `step()` later. A
sequence that turns out to have stopped at N-1 (stop token or string) computes one wasted token at N, which is
dropped; one known to end by length is finished before N is scheduled. Penalties read the previous tokens on the
host, so a step whose batch sampled with penalties is settled before the next one is scheduled. Observable
differences: outputs come one `step()` later (plus one last step that only settles), and an abort drops the token
in flight. Between `step()` calls no placeholder is left in any sequence. Unset (None), it is on where the engine
runs on a GPU and off on CPU, where the forward and the host share the same cores (`resolve_async_scheduling`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from lorafleet.worker.config import EngineConfig, resolve_async_scheduling, resolve_device, resolve_dtype
from lorafleet.worker.engine.block_manager import BlockManager
from lorafleet.worker.engine.detokenizer import IncrementalDetokenizer
from lorafleet.worker.engine.logprobs import StepLogprobs, TokenLogprob
from lorafleet.worker.engine.model_runner import PLACEHOLDER, ModelRunner, SampledTokens, kv_block_bytes
from lorafleet.worker.engine.plugin import IterationInfo, IterationPlugin
from lorafleet.worker.engine.plugin_host import PluginHost
from lorafleet.worker.engine.request_log import RequestTpotLog
from lorafleet.worker.engine.scheduler import ScheduledBatch, Scheduler
from lorafleet.worker.engine.sequence import RequestOutput, SamplingParams, Sequence, SequenceStatus
from lorafleet.worker.engine.stopping import build_output, check_stop, eos_token_ids, finish_text
from lorafleet.worker.layers.attention import triton_attention_available
from lorafleet.worker.loader import checkpoint_dtype, load_hf_config, load_model, load_tokenizer
from lorafleet.worker.lora.adapter import AdapterError, UnknownAdapterError
from lorafleet.worker.lora.store import AdapterStore, AdapterVersion

log = logging.getLogger(__name__)
__all__ = ["LLMEngine", "EngineStats", "IterationInfo", "AdapterError", "UnknownAdapterError"]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float
    num_preemptions: int
    iteration_tokens: int
    running_by_adapter: dict[str, int] = field(default_factory=dict)
    waiting_by_adapter: dict[str, int] = field(default_factory=dict)
    max_loras: int = 0
    prefix_cache_hit_tokens: int = 0
    adapters: dict[str, int] = field(default_factory=dict)  # store tier counts and load/evict counters


class LLMEngine(PluginHost):
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.device = resolve_device(config.device)
        # the engine's own copy: auto settings resolved for this device (the caller's config may serve others)
        config = replace(config, async_scheduling=resolve_async_scheduling(config.async_scheduling, self.device))
        self.config = config
        self.hf_config = load_hf_config(config.model)
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint_dtype(self.hf_config))
        max_pos = getattr(self.hf_config, "max_position_embeddings", 4096)
        self.max_model_len = config.max_model_len or max_pos
        self.model, _ = load_model(config.model, self.device, self.dtype, max(max_pos, self.max_model_len))
        if self.device.type == "cuda":
            self.model.fuse_projections()  # q|k|v and gate|up as one GEMM (+ one LoRA shrink/expand) each
            if config.triton_elementwise and triton_attention_available(self.device):
                self.model.use_triton_elementwise()
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(self.hf_config, self.tokenizer, config.model)
        self.store = AdapterStore(
            self.model.shape,
            self.device,
            self.dtype,
            max_slots=config.max_loras,
            max_cpu=config.max_cpu_loras,
            max_rank=config.max_lora_rank,
            roots=config.adapter_roots,
        )
        num_blocks = config.num_kv_blocks or self._derive_num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.store)
        self.runner = ModelRunner(
            self.model,
            self.store,
            num_blocks,
            config.block_size,
            config.seed,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            max_num_batched_tokens=config.max_num_batched_tokens if config.prefill_graphs else None,
            merge_switch=config.merge_switch,
        )
        self._plugins: list[IterationPlugin] = []
        self.request_tpots = RequestTpotLog()  # finished requests' TPOT: co-serving steers by its percentile
        self._requests: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # abort notices delivered by the next step()
        self._inflight: SampledTokens | None = None  # async scheduling: launched step whose tokens are unsettled
        self._inflight_logprobs: StepLogprobs | None = None  # ... and its logprobs (rows that asked)
        self._step = 0
        self._last_tokens = 0
        log.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d",
            config.model,
            self.device,
            self.dtype,
            num_blocks,
            config.block_size,
        )

    # ---- setup helpers -------------------------------------------------------------------------------------------
    def _derive_num_blocks(self) -> int:
        per_block = kv_block_bytes(self.model, self.config.block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - (1 - self.config.kv_cache_fraction) * total)
            budget = max(budget, int(free * self.config.kv_cache_fraction))
        else:
            budget = self.config.kv_cache_bytes
        num_blocks = max(1, budget // per_block)
        fits = num_blocks * self.config.block_size
        if fits < self.max_model_len:
            if self.config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {self.max_model_len} needs more KV cache than the budget holds ({fits} tokens); "
                    "raise kv_cache_bytes/kv_cache_fraction or lower max_model_len"
                )
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d", fits, self.max_model_len)
            self.max_model_len = fits
        return num_blocks

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora_name: str | None = None
    ) -> None:
        params.validate()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; this model's context is {self.max_model_len} (max_model_len)")
        if self.block_manager.blocks_for(n + 1) > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {n} tokens does not fit the KV cache ({self.block_manager.num_blocks} blocks)")
        vocab = self.model.shape.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.min_tokens > 0:  # what the sampler masks until the output is min_tokens long
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            params = replace(params, min_tokens_stop_ids=tuple(sorted(stop_ids)))
        adapter: AdapterVersion | None = self.store.acquire(lora_name) if lora_name else None
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output)
        seq = Sequence(request_id, prompt_token_ids, params, adapter, gen, detok)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._requests.pop(request_id, None)
        if seq is None or seq.status == SequenceStatus.FINISHED:
            return
        self.scheduler.finish(seq, "abort")
        self._pending.append(build_output(seq, []))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    # ---- the loop ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.config.async_scheduling:
            return self._step_async()
        t0 = time.perf_counter()
        if self._inflight is not None:  # async scheduling was just switched off: settle the step in flight first
            prev, self._inflight = self._inflight, None
            self._pending += self._settle(prev, set(), self._take_inflight_logprobs())
        outputs, self._pending = self._pending, []
        batch = self._schedule(outputs)
        forward_s = 0.0
        decode_tokens = self._decode_tokens(batch)
        if batch.seqs:
            if self._plugins:  # queue the step, let the plugins queue theirs, then wait for this step's tokens
                t_fwd = time.perf_counter()
                launched = self.runner.launch(batch)
                step_lp = self.runner.sampler.take_logprobs()
                self._after_launch(t0, batch, decode_tokens, self.runner.last_forward_seconds)
                sampled = dict(zip(launched.seqs, launched.tolist(), strict=True))
                forward_s = time.perf_counter() - t_fwd  # as execute(): until the tokens are on the host
            else:
                sampled = self.runner.execute(batch)
                step_lp = self.runner.sampler.take_logprobs()
                forward_s = self.runner.last_forward_seconds
            caching = self.block_manager.enable_prefix_caching
            for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
                seq.num_computed_tokens += n
                if caching:
                    self.block_manager.commit(seq, seq.cache_salt)
            entries = step_lp.host() if step_lp is not None else {}
            for row, (seq, tok) in enumerate(sampled.items()):  # rows in sampling order
                seq.token_ids.append(tok)
                outputs.append(self._check_stop(seq, tok, entries.get(row)))
            if self.scheduler.waiting:
                self._prefetch_waiting()
        self._finish_step(t0, batch, decode_tokens, forward_s)
        return outputs

    def _schedule(self, outputs: list[RequestOutput]) -> ScheduledBatch:
        """The next batch; requests the scheduler refused are aborted and their final outputs go to `outputs`."""
        batch = self.scheduler.schedule()
        for seq, err in batch.failed:
            log.warning("request %s aborted: %s", seq.request_id, err)
            self._requests.pop(seq.request_id, None)
            outputs.append(build_output(seq, []))
        return batch

    @staticmethod
    def _decode_tokens(batch: ScheduledBatch) -> int:
        """Sequences decoding in `batch` (one new token after an output token), counted before it runs."""
        return sum(1 for seq, n in zip(batch.seqs, batch.num_tokens, strict=True) if n == 1 and seq.num_output_tokens)

    def _step_async(self) -> list[RequestOutput]:
        """Schedules and launches this step, then settles the previous one while this one computes."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        prev, self._inflight = self._inflight, None
        prev_lp = self._take_inflight_logprobs()
        if prev is not None and prev.needs_host:
            outputs += self._settle(prev, set(), prev_lp)  # the next inputs need host tokens: no overlap this step
            prev = None
        closing = self._add_placeholders(prev) if prev is not None else set()
        batch = self._schedule(outputs)
        forward_s = 0.0
        decode_tokens = self._decode_tokens(batch)
        if batch.seqs:
            self._inflight = self.runner.launch(batch, prev)
            self._inflight_logprobs = self.runner.sampler.take_logprobs()
            forward_s = self.runner.last_forward_seconds
            for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
                seq.num_computed_tokens += n
            self._after_launch(t0, batch, decode_tokens, forward_s)
        if prev is not None:
            outputs += self._settle(prev, closing, prev_lp)
        if batch.seqs:
            if self.block_manager.enable_prefix_caching:
                for seq in batch.seqs:  # after settling: every token up to num_computed_tokens is real now
                    if seq.status == SequenceStatus.RUNNING:
                        self.block_manager.commit(seq, seq.cache_salt)
            if self.scheduler.waiting:
                self._prefetch_waiting()
        self._finish_step(t0, batch, decode_tokens, forward_s)
        return outputs

    def _add_placeholders(self, prev: SampledTokens) -> set[Sequence]:
        """Gives every live sequence that sampled in `prev` its next token as a PLACEHOLDER, so the scheduler sees
        it decoding; those that end by length whatever the token are finished now (no wasted step). Returns them."""
        closing: set[Sequence] = set()
        running = SequenceStatus.RUNNING
        for seq in prev.seqs:
            if seq.status != running:
                continue  # aborted, or finished while `prev` was in flight: its token is dropped
            seq.token_ids.append(PLACEHOLDER)
            if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                self.scheduler.finish(seq, "length")
                closing.add(seq)
        return closing

    def _take_inflight_logprobs(self) -> StepLogprobs | None:
        lp, self._inflight_logprobs = self._inflight_logprobs, None
        return lp

    def _settle(self, prev: SampledTokens, closing: set[Sequence], lp: StepLogprobs | None) -> list[RequestOutput]:
        """Waits for `prev`'s tokens on the host and does what the synchronous step does after its forward."""
        outputs = []
        finished = SequenceStatus.FINISHED
        entries = lp.host() if lp is not None else {}
        for row, (seq, tok) in enumerate(zip(prev.seqs, prev.tolist(), strict=True)):
            if seq.status == finished and seq not in closing:
                continue  # aborted, or stopped before this (wasted) token: never emitted
            if seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids[-1] = tok
            else:
                seq.token_ids.append(tok)  # settled before the next step was scheduled
            outputs.append(self._check_stop(seq, tok, entries.get(row)))
        return outputs

    def _check_stop(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Applies what `stopping.check_stop` decides for the token just placed at the end of `seq.token_ids`."""
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
        stop = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
        if stop is not None:
            self.request_tpots.add(seq.first_token_time, time.monotonic(), seq.num_output_tokens)
            finish_text(seq, stop)
            if seq.status == SequenceStatus.FINISHED:
                seq.finish_reason = stop.reason  # finished early by length (async); a stop token or string still wins
            else:
                self.scheduler.finish(seq, stop.reason)
            seq.stop_reason = stop.stop_reason
            self._requests.pop(seq.request_id, None)
        return build_output(seq, [token])

    def _prefetch_waiting(self) -> None:
        """Starts uploading the adapters of the next waiting requests so they are warm when admitted."""
        self.scheduler.prefetch()

    # ---- adapters ------------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, version: str | None = None) -> AdapterVersion:
        """Registers (or replaces) an adapter; raises AdapterError if it does not fit this worker."""
        return self.store.register(name, path, version)

    def unload_adapter(self, name: str) -> None:
        """Removes the name at once; requests already running on it finish on the weights they started with."""
        self.store.unregister(name)

    # ---- introspection -------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        run = Counter(s.lora_name for s in self.scheduler.running if s.lora_name)
        wait = Counter(s.lora_name for s in self.scheduler.waiting if s.lora_name)
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used,
            kv_usage=bm.num_used / bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            iteration_tokens=self._last_tokens,
            running_by_adapter=dict(run),
            waiting_by_adapter=dict(wait),
            max_loras=self.config.max_loras,
            prefix_cache_hit_tokens=bm.hit_tokens,
            adapters=self.store.stats(),
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, lora_names: list[str | None] | None = None
    ) -> list[RequestOutput]:
        """Convenience for tests and scripts: runs the given prompts to completion, returns final outputs in order."""
        ids = [f"gen-{self._step}-{i}" for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            self.add_request(ids[i], p, params, (lora_names or [None] * len(prompts))[i])
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for o in self.step():
                if o.finished and o.request_id in ids:
                    final[o.request_id] = o
        return [final[i] for i in ids]
