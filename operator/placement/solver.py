"""Adapter placement: CP-SAT over candidate sets, lexicographic objectives, hysteresis, greedy fallback.

Order of concerns (lexicographic, each phase fixes the previous one's value as a constraint):
  0. place as many replicas as capacity allows, priority-weighted, every adapter once before any twice (only run when
     the hint falls short);
  1. anti-affinity violations (replicas of one adapter sharing a node), then max worker load M -- one objective
     `excess * (UB - LB + 1) + M`, exactly lexicographic because M lives in [LB, UB] (UB is a load no worker can
     exceed whenever fewer violations may cost load);
  2. bytes moved relative to the current placement, with no more violations and M <= phase 1's (plus half the
     hysteresis band when there is a current placement: a near-optimal placement that moves far fewer bytes is the
     better answer, and one a re-solve keeps); below that, exactly lexicographic by weighting, the sum of worker
     loads above the mean, so placements with the same maximum prefer the even one.
Hysteresis: when the current placement, repaired for capacity and replica-bound violations, places everything with
no more violations and a max load within `hysteresis` of phase 1's (or, before any search, of the relaxation bound
with only unavoidable violations), it is kept and nothing but the repairs moves.
`migration_weight` <= 0 drops the moved-bytes term from phase 2 (moves are treated as free).
Status OPTIMAL means the max load is proven optimal (CP-SAT within the candidate model, or equal to the relaxation
bound); phase 2 is a refinement that stops at its time limit or gap.

Scale: candidate sets (candidates.py); a complete hint, the best of the balanced greedy, the repaired current
placement and a sticky rebalance of it (sticky.py, few bytes moved); a wall-clock limit covering everything from the
problem build on; M's domain floored at the relaxation bound, and phase 1 stopped at the first solution within 0.5 %
of it with only unavoidable violations. Fallback: with no time, or if CP-SAT returns no solution, the best hint (or
the repaired current placement, under the same hysteresis rule) is returned as GREEDY_FALLBACK.
"""

from __future__ import annotations

import math
import time

import numpy as np
from lorafleet.operator.placement import greedy
from lorafleet.operator.placement.candidates import candidate_sets
from lorafleet.operator.placement.evaluate import (
    Assignment,
    anti_affinity_excess,
    excess_floor,
    moved_bytes,
    relaxation_bound,
    shortfall,
    worker_loads,
)
from lorafleet.operator.placement.model import PlacementModel, build_model
from lorafleet.operator.placement.problem import Problem, build_problem
from lorafleet.operator.placement.sticky import sticky_rebalance
from lorafleet.operator.placement.types import Adapter, PlacementParams, PlacementResult, PlacementStatus, Worker
from ortools.sat.python import cp_model

# Share of the remaining time given to phase 1 when phase 2 will follow.
_PHASE1_SHARE = 0.6
# Phase 1 stops once within this relative distance of the relaxation bound (balance differences below it are noise).
_PHASE1_GAP = 5e-3
# Phase 2 stops once its objective is within this fraction of the fleet's total load of its bound.
_SPREAD_GAP = 2e-3
# A move may land up to this fraction of the hysteresis above the best max load found, if that saves bytes. Half the
# band keeps the result stable: solving again from it finds it within hysteresis and moves nothing.
_MIGRATION_SLACK = 0.5
# Most of the time limit that a spread-only phase 2 (no current placement) may take.
_SPREAD_SHARE = 0.15


def solve(
    workers: list[Worker],
    adapters: list[Adapter],
    current: dict[str, set[str]] | None = None,
    params: PlacementParams | None = None,
) -> PlacementResult:
    """Place adapter replicas on workers. Pure: same inputs (and deterministic=True) give the same result."""
    t0 = time.perf_counter()
    params = params or PlacementParams()
    p = build_problem(workers, adapters, current, params)
    return _Solve(p, params, t0).run()


def _score(p: Problem, assign: Assignment, anti_affinity: bool = True) -> tuple[int, int, float]:
    """Lexicographic quality: (missing replicas, anti-affinity excess, max load); lower is better."""
    return (
        sum(shortfall(p, assign).values()),
        anti_affinity_excess(p, assign) if anti_affinity else 0,
        float(worker_loads(p, assign).max(initial=0.0)),
    )


class _Solve:
    """One solve's state; `run` walks the phases described in the module docstring."""

    def __init__(self, p: Problem, params: PlacementParams, t0: float) -> None:
        self.p = p
        self.params = params
        self.t0 = t0
        self.deadline = t0 + max(0.0, params.time_limit_s)
        self.lb = relaxation_bound(p)
        self.cp_bound = 0.0
        self.solver_status = "NOT_RUN"
        self.timings: dict[str, float] = {}
        self._mark = t0
        self.deterministic_used = 0.0  # CP-SAT deterministic seconds spent by the phases so far

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap under `name` (reported in PlacementResult.timings)."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._mark
        self._mark = now

    def score(self, assign: Assignment) -> tuple[int, int, float]:
        return _score(self.p, assign, self.params.anti_affinity)

    def remaining(self) -> float:
        """Budget left for the next phase. Deterministic solves count only CP-SAT's deterministic time, so a loaded
        machine (slow model building) cannot change their result; others count wall time from the start."""
        if self.params.deterministic:
            return self.params.time_limit_s - self.deterministic_used
        return self.deadline - time.perf_counter()

    def run(self) -> PlacementResult:
        p = self.p
        self.lap("problem")
        balanced = greedy.balanced(p)
        repaired = greedy.repair(p) if any(p.current) else None
        self.lap("greedy")
        if p.num_workers == 0 or int(p.replicas.sum()) == 0:
            return self._result(balanced, PlacementStatus.OPTIMAL, kept=False)
        if repaired is not None and self._keep(
            repaired, (0, excess_floor(p) if self.params.anti_affinity else 0, self.lb), self.lb
        ):
            # Fast path: the current placement places everything, with no avoidable anti-affinity violation, within
            # hysteresis of a load bound no placement can beat.
            self.solver_status = "SKIPPED_WITHIN_HYSTERESIS"
            return self._result(repaired, PlacementStatus.OPTIMAL, kept=True)
        hints = [balanced]
        if repaired is not None:
            steps = 4 * p.num_workers
            hints += [repaired, sticky_rebalance(p, repaired, self.lb * (1 + _PHASE1_GAP), steps)]
            self.lap("sticky")
        hint = self._best_hint(hints)
        if self.remaining() <= 0:
            return self._fallback(hint, repaired)
        return self._cpsat(hint, repaired, hints)

    def _best_hint(self, hints: list[Assignment]) -> Assignment:
        """Best (missing replicas, anti-affinity, max load); among those within the migration slack of the best max
        load, the one that moves the fewest bytes (the balanced greedy ignores the current placement entirely)."""
        scores = [self.score(h) for h in hints]
        top = min(scores)
        slack = 1 + _MIGRATION_SLACK * self.params.hysteresis
        near = [i for i, sc in enumerate(scores) if sc[:2] == top[:2] and sc[2] <= top[2] * slack + 1e-12]
        return hints[min(near, key=lambda i: (moved_bytes(self.p, hints[i]), scores[i]))]

    def _keep(self, repaired: Assignment, best: tuple[int, int, float], best_load: float) -> bool:
        short, excess, load = self.score(repaired)
        return short <= best[0] and excess <= best[1] and load <= (1 + self.params.hysteresis) * best_load + 1e-12

    def _fallback(self, hint: Assignment, repaired: Assignment | None) -> PlacementResult:
        if repaired is not None and self._keep(repaired, self.score(hint), self.score(hint)[2]):
            return self._result(repaired, PlacementStatus.GREEDY_FALLBACK, kept=True)
        return self._result(hint, PlacementStatus.GREEDY_FALLBACK, kept=False)

    def _params(self, seconds: float, gap: float, absolute_gap: float) -> cp_model.CpSolver:
        s = cp_model.CpSolver()
        s.parameters.random_seed = self.params.seed
        s.parameters.relative_gap_limit = gap
        s.parameters.absolute_gap_limit = absolute_gap
        # Presolve costs ~40 % of a 1 s budget at 1000x64 and buys nothing here: the hint is complete, the model is
        # already tight (exactly-one rows, capacity rows only where they can bind), and LNS does the improving.
        s.parameters.cp_model_presolve = False
        if self.params.deterministic:
            s.parameters.num_workers = 1
            s.parameters.max_deterministic_time = max(0.01, seconds)
        else:
            s.parameters.num_workers = max(1, self.params.num_workers_threads)
            s.parameters.max_time_in_seconds = max(0.01, seconds)
        return s

    def _run_phase(
        self,
        name: str,
        pm: PlacementModel,
        seconds: float,
        gap: float,
        absolute_gap: float = 0.0,
        stop_at: int | None = None,
    ) -> tuple[cp_model.CpSolver, Assignment | None]:
        s = self._params(seconds, gap, absolute_gap)
        self.lap("model")
        status = s.solve(pm.model, _StopAt(stop_at) if stop_at is not None else None)
        self.lap(name)
        self.deterministic_used += s.response_proto.deterministic_time
        self.solver_status = s.status_name(status)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return s, None
        return s, pm.assignment(np.asarray(s.response_proto.solution, dtype=np.int64), self.p.num_adapters)

    def _cpsat(self, hint: Assignment, repaired: Assignment | None, hints: list[Assignment]) -> PlacementResult:
        p, params = self.p, self.params
        cands = candidate_sets(p, hints, worker_loads(p, hint), params.candidates_per_adapter, params.seed)
        self.lap("candidates")
        soft = sum(shortfall(p, hint).values()) > 0
        lb_int = int(math.floor(self.lb * p.scale))
        pm = build_model(p, cands, lb_int, hint, soft, params.anti_affinity)
        ub_int = pm.ub_int
        pm.hint(hint)
        self.lap("model")
        if self.remaining() <= 0:  # building took the whole budget: answer now rather than overrun it
            return self._fallback(hint, repaired)
        migrate = repaired is not None and params.migration_weight > 0
        optimal = True
        if soft:
            # Phase 0: as many (priority-weighted) replicas as capacity allows, then hold that.
            placed = pm.placed_expr(p)
            pm.model.maximize(placed)
            s, sol = self._run_phase("capacity", pm, self.remaining() * 0.3, 0.0)
            if sol is None:
                return self._fallback(hint, repaired)
            optimal = self.solver_status == "OPTIMAL"
            pm.model.add(placed >= int(round(s.objective_value)))
            hint = sol
            pm.hint(hint)
        excess = cp_model.LinearExpr.sum(pm.excess) if pm.excess else 0
        weight = ub_int - lb_int + 1
        pm.model.minimize(excess * weight + pm.max_load if pm.excess else pm.max_load)
        # Stop as soon as both parts reach bounds known without search: the excess floor and (within _PHASE1_GAP) the
        # relaxation bound. Capping the load part at ub keeps the stop exact on excess: one more excess unit costs
        # `weight` > ub - lb. CP-SAT's relative gap limit is not used here for the same reason: on the combined
        # objective it could accept an extra anti-affinity violation.
        stop_at = pm.excess_floor * weight + min(ub_int, int(lb_int * (1 + _PHASE1_GAP)))
        s, sol = self._run_phase("balance", pm, self.remaining() * _PHASE1_SHARE, 0.0, stop_at=stop_at)
        if sol is None:
            return self._fallback(hint, repaired)
        # Reaching the relaxation bound and the excess floor proves optimality even when the search was cut short.
        at_bounds = pm.int_max_load(sol) <= lb_int and pm.excess_of(sol) <= pm.excess_floor
        optimal = optimal and (self.solver_status == "OPTIMAL" or at_bounds)
        if not pm.excess:
            self.cp_bound = s.best_objective_bound / p.scale
        best = self.score(sol)
        if repaired is not None and self._keep(repaired, best, best[2]):
            return self._result(repaired, _status(optimal), kept=True)
        # Phase 2: at no worse anti-affinity and a max load within the migration slack of phase 1's, the fewest bytes
        # moved, then the most even spread below the max.
        m1 = pm.int_max_load(sol)
        slack = _MIGRATION_SLACK * params.hysteresis if migrate else 0.0
        pm.model.add(pm.max_load <= max(m1, int(m1 * (1 + slack))))
        if pm.excess:
            pm.model.add(excess <= pm.excess_of(sol))
        spread = pm.spread_expr()
        pm.model.minimize(pm.moved_expr(p) * (pm.target_total + 1) + spread if migrate else spread)
        pm.hint(sol)
        # Without a current placement phase 2 only evens out loads below the max: cosmetic, so it gets a short slice.
        seconds = self.remaining() if migrate else min(self.remaining(), _SPREAD_SHARE * params.time_limit_s)
        _, sol2 = self._run_phase("migration", pm, seconds, 0.0, absolute_gap=_SPREAD_GAP * pm.target_total)
        self.solver_status = "OPTIMAL" if optimal else "FEASIBLE"
        if sol2 is None:  # no phase-2 answer in time: phase 1's, or its hint if that moves less within the slack
            final = self._best_hint([sol, hint]) if migrate else sol
            return self._result(final, _status(optimal and pm.int_max_load(final) <= m1), kept=False)
        # The constraints above keep any phase-2 solution at least as good as `sol`.
        return self._result(sol2, _status(optimal and pm.int_max_load(sol2) <= m1), kept=False)

    def _result(self, assign: Assignment, status: PlacementStatus, kept: bool) -> PlacementResult:
        p = self.p
        loads = worker_loads(p, assign)
        top = float(loads.max(initial=0.0))
        mean = float(loads.mean()) if loads.size else 0.0
        # CP-SAT's bound is on integer-rounded loads: never let rounding put it above the float objective.
        bound = min(top, float(max(self.lb, self.cp_bound)))
        unplaced = dict(p.unplaced)
        for a, missing in shortfall(p, assign).items():
            name = p.adapters[a].name
            got = int(p.replicas[a]) - missing
            reason = f"InsufficientCapacity: placed {got} of {int(p.replicas[a])} replicas; slots or memory exhausted"
            unplaced[name] = f"{unplaced[name]}; {reason}" if name in unplaced else reason
        if unplaced:
            status = PlacementStatus.INFEASIBLE_PARTIAL
        elif kept and status is PlacementStatus.OPTIMAL and top > bound * (1 + 1e-9):
            status = PlacementStatus.FEASIBLE  # kept for stability, not proven optimal
        names = [w.name for w in p.workers]
        return PlacementResult(
            assignment={a.name: [names[w] for w in assign[i]] for i, a in enumerate(p.adapters)},
            moved_bytes=moved_bytes(p, assign),
            loads={n: float(v) for n, v in zip(names, loads.tolist(), strict=True)},
            max_over_mean=top / mean if mean > 0 else 1.0,
            objective=top,
            bound=bound,
            gap=(top - bound) / bound if bound > 0 else 0.0,
            status=status,
            solve_seconds=time.perf_counter() - self.t0,
            timings={k: round(v, 4) for k, v in self.timings.items()},
            unplaced=unplaced,
            kept_current=kept,
            relaxation_bound=float(self.lb),
            solver_status=self.solver_status,
            replicas={a.name: int(p.replicas[i]) for i, a in enumerate(p.adapters)},
        )


class _StopAt(cp_model.CpSolverSolutionCallback):
    """Ends the search at the first solution whose objective is <= a target that is provably good enough (CP-SAT's
    own bound is often slower to reach it than the solution is)."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def on_solution_callback(self) -> None:
        if self.objective_value <= self.target:
            self.stop_search()


def _status(optimal: bool) -> PlacementStatus:
    return PlacementStatus.OPTIMAL if optimal else PlacementStatus.FEASIBLE
