"""What activation reuse computes, exactly: training a sample against its prompt's K/V (stashed, or recomputed
under no-grad) gives the full-backprop gradient minus precisely the paths through the prompt positions.

The split is tested as an identity. A LoRA applied with its gradient on some rows only (the other rows use a
detached copy: same values) partitions the full gradient by rows; the reuse gradient must equal the completion-rows
part, and completion part + prompt part must equal full backprop. The prompt part is large (the k/v LoRA of the
prompt tokens is how a task that reads fields out of the prompt learns where to look), which is why a job trains
stashed samples with their prompt gradient unless it opts into the cut (docs/training-api.md, Activation reuse)."""

from __future__ import annotations

import torch
from lorafleet.worker.training.lora_context import TrainableLoRA, TrainLoRAContext
from lorafleet.worker.training.trainer import LoRATrainer, OptimConfig, TrainSample

PROMPT, COMPLETION = [8, 8, 90, 14, 3, 77, 5], [33, 12, 5, 71, 2]
N_TERMS = 64 * 128  # rows x the tiny model's widest contraction: grad_close's float32 bound


class _RowsLoRA(TrainLoRAContext):
    """The LoRA with its parameters' gradient on rows [lo, hi) only: elsewhere the same delta from detached A/B
    (x keeps its gradient through it), i.e. a copy of the parameters per group of rows, whose gradients add up."""

    def __init__(self, lora: TrainableLoRA, lo: int, hi: int) -> None:
        super().__init__(lora, torch.float32)
        self.lo, self.hi = lo, hi

    def apply(self, layer_idx, proj, x, y):
        p = self.lora.pair(layer_idx, proj)
        if p is None:
            return y
        a, b = p
        live = (x @ a.t()) @ b.t() * self.lora.scale
        frozen = (x @ a.detach().t()) @ b.detach().t() * self.lora.scale
        rows = torch.zeros(x.shape[0], 1, dtype=torch.bool)
        rows[self.lo : self.hi] = True
        return y + torch.where(rows, live, frozen)


def _grads(trainer: LoRATrainer, sample: TrainSample, ctx=None) -> dict:
    trainer.opt.zero_grad(set_to_none=True)
    trainer.loss_sum(sample, ctx).backward()
    return trainer.grads()


def test_reuse_gradient_is_full_backprop_minus_the_prompt_positions(tiny_model, adapter_dir, grad_close):
    lora = TrainableLoRA.from_peft(tiny_model.shape, adapter_dir)
    trainer = LoRATrainer(tiny_model, lora, OptimConfig(max_grad_norm=None))
    n_prefix = len(PROMPT) - 1  # the rows a reused sample does not forward
    n_rows = len(PROMPT) + len(COMPLETION) - 1
    full = _grads(trainer, TrainSample(PROMPT, COMPLETION))
    reused = _grads(trainer, TrainSample(PROMPT, COMPLETION, prefix_kv=trainer.prompt_kv(PROMPT)))
    completion_part = _grads(trainer, TrainSample(PROMPT, COMPLETION), _RowsLoRA(lora, n_prefix, n_rows))
    prompt_part = _grads(trainer, TrainSample(PROMPT, COMPLETION), _RowsLoRA(lora, 0, n_prefix))
    missing = total = 0.0
    for key in full:
        for i in (0, 1):
            grad_close(reused[key][i], completion_part[key][i], N_TERMS)
            grad_close(completion_part[key][i] + prompt_part[key][i], full[key][i], N_TERMS)
            missing += float(prompt_part[key][i].pow(2).sum())
            total += float(full[key][i].pow(2).sum())
    # the cut is material: more than a tenth of the full gradient's norm lives on the prompt positions
    assert (missing / total) ** 0.5 > 0.1
    # and it reaches every projection of the first layer through the later layers' prompt K/V
    assert float(prompt_part[(0, "q_proj")][1].abs().sum()) > 0
    assert float(prompt_part[(0, "o_proj")][1].abs().sum()) > 0
