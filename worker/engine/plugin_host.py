"""The engine's side of the `IterationPlugin` seam (plugin.py): attaching plugins and calling them back each step.

Why a mixin of `LLMEngine`: the callbacks need the step's batch, timings and KV usage, which only the engine has,
but how plugins are attached, guarded (one that raises is logged and skipped: serving never fails for a plugin) and
told about a step is one concept apart from the serving loop itself.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lorafleet.worker.engine.plugin import IterationInfo, IterationPlugin, PrefillRecord
from lorafleet.worker.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from lorafleet.worker.engine.model_runner import StepInputs

log = logging.getLogger(__name__)


class PluginHost:
    """Expects `config`, `block_manager`, `runner`, `_plugins` and `_step` on the engine it is mixed into."""

    config: Any
    block_manager: Any
    runner: Any
    _plugins: list[IterationPlugin]
    _step: int
    _last_tokens: int

    def _info(self, t0: float, batch: ScheduledBatch, decode_tokens: int, forward_s: float, step: int):
        return IterationInfo(
            step=step,
            num_scheduled_tokens=batch.total_tokens,
            leftover_tokens=self.config.max_num_batched_tokens - batch.total_tokens,
            num_prefill_tokens=batch.total_tokens - decode_tokens,
            num_decode_tokens=decode_tokens,
            num_seqs=len(batch.seqs),
            step_seconds=time.perf_counter() - t0,
            forward_seconds=forward_s,
            kv_usage=self.block_manager.num_used / self.block_manager.num_blocks,
        )

    def _after_launch(self, t0: float, batch: ScheduledBatch, decode_tokens: int, forward_s: float) -> None:
        if self._plugins:
            info = self._info(t0, batch, decode_tokens, forward_s, self._step + 1)
            for plugin in list(self._plugins):
                self._guarded(plugin.after_launch, info)

    def _finish_step(self, t0: float, batch: ScheduledBatch, decode_tokens: int, forward_s: float) -> None:
        self._last_tokens = batch.total_tokens
        self._step += 1
        if self._plugins:
            info = self._info(t0, batch, decode_tokens, forward_s, self._step)
            for plugin in list(self._plugins):
                self._guarded(plugin.after_step, info)

    def add_plugin(self, plugin: IterationPlugin) -> None:
        """Attaches `plugin` to this engine (engine thread); its callbacks run from the next step on."""
        if plugin in self._plugins:
            return
        plugin.attach(self)
        self._plugins.append(plugin)
        self.runner.prefill_observer = self._on_prefill

    def remove_plugin(self, plugin: IterationPlugin) -> None:
        if plugin in self._plugins:
            self._plugins.remove(plugin)
        if not self._plugins:
            self.runner.prefill_observer = None

    def _on_prefill(self, batch: ScheduledBatch, inputs: StepInputs) -> PrefillRecord | None:
        records = [r for p in list(self._plugins) if (r := self._guarded(p.on_prefill, batch, inputs)) is not None]
        if len(records) <= 1:
            return records[0] if records else None

        def record_all(kv_caches, slot_mapping) -> None:
            for r in records:
                self._guarded(r, kv_caches, slot_mapping)

        return record_all

    @staticmethod
    def _guarded(fn, *args):
        """Calls a plugin callback; one that raises is logged and skipped (serving never fails for a plugin)."""
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("plugin callback %r failed", fn)
            return None
