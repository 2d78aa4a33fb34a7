"""Plain data for the placement model: what the operator measures and wants in, what it should do out.

Why plain dataclasses: the placement is a pure function of these values, so unit tests and the benchmark build them
directly and the kopf handlers only translate CR status / worker metrics into them (no kube objects leak in here).
Rates and loads share one unit chosen by the caller (requests/s or tokens/s); only ratios matter to the solver.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Worker:
    """One worker pod (one GPU engine) that can hold adapters.

    memory_bytes is the adapter memory budget (not the whole GPU), slots the most GPU-resident adapters, load the
    measured baseline that is not attributable to adapters we place (base-model traffic, co-served training).
    """

    name: str
    node: str
    memory_bytes: int
    slots: int
    max_rank: int
    load: float = 0.0
    ready: bool = True


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter to serve.

    rate is its measured traffic; it is split evenly over its replicas. With auto=True the replica count follows the
    rate (PlacementParams.per_replica_target_rate) inside [min_replicas, max_replicas]; otherwise it is min_replicas.
    Higher priority wins when capacity runs out.
    """

    name: str
    size_bytes: int
    rank: int
    rate: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 1
    auto: bool = False
    priority: int = 0


@dataclass(frozen=True)
class PlacementParams:
    """Knobs of one solve. Defaults suit the operator's periodic rebalance on a 2-core controller."""

    time_limit_s: float = 1.0
    candidates_per_adapter: int = 8
    # Relative max-load improvement the new placement must bring before anything moves (0.05 = 5 %).
    hysteresis: float = 0.05
    # Auto replicas: ceil(rate / per_replica_target_rate); 0 disables auto scaling (min_replicas is used).
    per_replica_target_rate: float = 0.0
    # Moved bytes are minimised lexicographically after balance (solver.py, phase 2) when > 0; 0 treats moves as free
    # (phase 2 then only evens out loads). A weighted mix was rejected: its exchange rate between bytes and load would
    # need tuning per fleet, while "best balance, then fewest bytes, within half the hysteresis band" needs none.
    migration_weight: float = 1.0
    anti_affinity: bool = True
    seed: int = 0
    num_workers_threads: int = 2
    # Deterministic search: single-threaded, limited by CP-SAT's deterministic time instead of wall time, so the same
    # input and seed give the same answer on any machine (used by tests and reproducible benchmarks).
    deterministic: bool = False


class PlacementStatus(enum.StrEnum):
    """How good the answer is known to be.

    OPTIMAL: the max load is proven optimal (CP-SAT proved it within the candidate model, or it equals the relaxation
    bound). FEASIBLE: valid, not proven optimal (time limit, early stop, or the current placement kept by hysteresis).
    GREEDY_FALLBACK: CP-SAT had no time or found nothing; the greedy (or kept current) placement is returned.
    INFEASIBLE_PARTIAL wins over all of them whenever some wanted replica could not be placed (see `unplaced`).
    """

    OPTIMAL = "OPTIMAL"
    FEASIBLE = "FEASIBLE"
    GREEDY_FALLBACK = "GREEDY_FALLBACK"
    INFEASIBLE_PARTIAL = "INFEASIBLE_PARTIAL"


@dataclass
class PlacementResult:
    """The placement to converge to, with enough numbers to explain it in status and metrics.

    objective is the max worker load of the returned assignment, bound a proven lower bound on it (the larger of the
    capacity-free relaxation bound and CP-SAT's own bound on the restricted model), gap = (objective - bound) / bound.
    kept_current is True when hysteresis kept the (repaired) current placement.
    """

    assignment: dict[str, list[str]]
    moved_bytes: int
    loads: dict[str, float]
    max_over_mean: float
    objective: float
    bound: float
    gap: float
    status: PlacementStatus
    solve_seconds: float
    unplaced: dict[str, str] = field(default_factory=dict)
    kept_current: bool = False
    relaxation_bound: float = 0.0
    solver_status: str = ""
    replicas: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(
        default_factory=dict
    )  # seconds per stage: problem, greedy, candidates, model, capacity/balance/migration


@dataclass(frozen=True)
class Move:
    """One step of a migration: load `add` (if any) first, then unload `remove` (if any)."""

    adapter: str
    add: str | None
    remove: str | None
