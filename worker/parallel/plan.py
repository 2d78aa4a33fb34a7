"""Which part of every weight a tensor-parallel rank holds: pure arithmetic over the model's shape.

The layout (Megatron-LM's, as vLLM uses it):
- column-parallel (q, k, v, gate, up): the rank holds a contiguous block of output rows; its input is replicated.
  Query heads split evenly. KV heads split evenly when there are at least as many as ranks; with fewer (GQA with
  tp > num_kv_heads) each rank holds the one KV head its query heads read, so ranks replicate KV heads.
- row-parallel (o, down): the rank holds the input columns that match its column-parallel outputs; outputs are
  partial sums, all-reduced.
- vocabulary-parallel embedding and head: the vocabulary, padded to a multiple of tp, split into equal blocks.
- LoRA (vLLM's `fully_sharded_loras`): column-parallel A is split along the rank r (padded to a multiple of tp with
  zero rows, which add nothing), B along its output rows like the base weight; row-parallel A is split along its
  input columns like the base weight, B along its output rows into equal blocks. Every rank keeps 1/tp of every
  adapter (exactly, when the dimensions divide).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorafleet.worker.models.llama import ModelShape

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def check_shape(shape: ModelShape, world: int) -> None:
    """Raises ValueError naming the dimension that tp=`world` cannot split."""
    if world < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {world}")
    problems = []
    if shape.num_heads % world:
        problems.append(f"num_attention_heads={shape.num_heads}")
    kv = shape.num_kv_heads
    if kv % world and world % kv:
        problems.append(f"num_key_value_heads={kv} (neither a multiple nor a divisor of tp)")
    if shape.intermediate_size % world:
        problems.append(f"intermediate_size={shape.intermediate_size}")
    if shape.hidden_size % world:
        problems.append(f"hidden_size={shape.hidden_size}")
    if problems:
        raise ValueError(f"tensor parallel size {world} does not divide " + ", ".join(problems))


def padded(n: int, world: int) -> int:
    """n rounded up to a multiple of world."""
    return -(-n // world) * world


@dataclass(frozen=True)
class ShardPlan:
    shape: ModelShape  # the whole model's
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        check_shape(self.shape, self.world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside tensor parallel size {self.world}")

    @property
    def q_heads(self) -> range:
        n = self.shape.num_heads // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        kv, w = self.shape.num_kv_heads, self.world
        if kv >= w:
            n = kv // w
            return range(self.rank * n, (self.rank + 1) * n)
        head = self.rank * kv // w  # the KV head this rank's query heads read (tp % kv == 0)
        return range(head, head + 1)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless tp > num_kv_heads)."""
        return max(1, self.world // self.shape.num_kv_heads)

    def _block(self, n: int) -> tuple[int, int]:
        k = n // self.world
        return self.rank * k, (self.rank + 1) * k

    def _heads(self, heads: range) -> tuple[int, int]:
        d = self.shape.head_dim
        return heads.start * d, heads.stop * d

    def rows(self, proj: str) -> tuple[int, int]:
        """[lo, hi) of a column-parallel projection's output rows on this rank."""
        if proj == "q_proj":
            return self._heads(self.q_heads)
        if proj in ("k_proj", "v_proj"):
            return self._heads(self.kv_heads)
        if proj in ("gate_proj", "up_proj"):
            return self._block(self.shape.intermediate_size)
        raise ValueError(f"{proj} is not column-parallel")

    def cols(self, proj: str) -> tuple[int, int]:
        """[lo, hi) of a row-parallel projection's input columns on this rank."""
        if proj == "o_proj":
            return self._heads(self.q_heads)
        if proj == "down_proj":
            return self._block(self.shape.intermediate_size)
        raise ValueError(f"{proj} is not row-parallel")

    def out_block(self) -> tuple[int, int]:
        """[lo, hi) of the hidden size: the output rows of a row-parallel LoRA B this rank holds."""
        return self._block(self.shape.hidden_size)

    @property
    def padded_vocab(self) -> int:
        return padded(self.shape.vocab_size, self.world)

    def vocab(self) -> tuple[int, int]:
        """[lo, hi) of the padded vocabulary on this rank (ids >= vocab_size are padding)."""
        return self._block(self.padded_vocab)

    def lora_rank_block(self, max_rank: int) -> tuple[int, int, int]:
        """(padded rank, lo, hi): the slice of a column-parallel A's rank dimension on this rank."""
        r = padded(max_rank, self.world)
        k = r // self.world
        return r, self.rank * k, (self.rank + 1) * k

    def local_shape(self) -> ModelShape:
        """The shape one rank's layers compute with (its heads and MLP width; the KV cache is sized from it)."""
        s = self.shape
        return dataclasses.replace(
            s,
            num_heads=len(self.q_heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=s.intermediate_size // self.world,
        )
