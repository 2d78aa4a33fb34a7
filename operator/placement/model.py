"""The CP-SAT model over candidate sets: 0/1 replica-on-worker variables, capacity, load and anti-affinity.

Variables: x[a,w] for each adapter a and candidate worker w; M, an upper bound on every worker's integer load; e[a,n]
for each adapter with >= 2 replicas and each node n holding >= 2 of its candidates, counting its extra replicas there.
Constraints: sum_w x[a,w] == r_a (or <= r_a when capacity cannot hold every replica, "soft"), per worker
sum x <= slots and sum size_kib * x <= memory_kib (omitted when the candidates cannot exceed them anyway),
base_w + sum share_a * x[a,w] <= M, and sum_{w on n} x[a,w] - 1 <= e[a,n].
The objectives (solver.py decides which and in which order) are read off these parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from lorafleet.operator.placement.evaluate import Assignment, flatten
from lorafleet.operator.placement.problem import Problem
from ortools.sat.python import cp_model


@dataclass
class PlacementModel:
    """Built model plus the handles the phases need."""

    model: cp_model.CpModel
    var_adapter: np.ndarray  # per x variable (in creation order): adapter index
    var_worker: np.ndarray  # per x variable: worker index
    var_index: np.ndarray  # per x variable: CP-SAT proto index
    x_vars: list[cp_model.IntVar]
    max_load: cp_model.IntVar
    excess: list[cp_model.IntVar]
    excess_groups: list[list[int]]  # per excess var: positions into x_vars of the adapter's candidates on that node
    int_share: np.ndarray
    int_base: np.ndarray
    per_worker: list[list[int]]  # per worker: positions into x_vars of its candidate replicas
    target_total: int  # integer load of the fleet when every target replica is placed
    excess_floor: int  # anti-affinity excess no assignment in this model can avoid (replicas beyond candidate nodes)
    ub_int: int
    lb_int: int
    overs: list[tuple[int, cp_model.IntVar]] = field(default_factory=list)  # (worker, load above mean), phase 2
    spread_mean: int = 0

    def assignment(self, solution: np.ndarray, num_adapters: int) -> Assignment:
        """Worker lists per adapter from a CP-SAT solution vector (response.solution)."""
        on = solution[self.var_index] > 0
        assign: Assignment = [[] for _ in range(num_adapters)]
        for a, w in zip(self.var_adapter[on].tolist(), self.var_worker[on].tolist(), strict=True):
            assign[a].append(w)
        return assign

    def int_max_load(self, assign: Assignment) -> int:
        return int_max_load(self.int_base, self.int_share, assign)

    def values(self, assign: Assignment) -> np.ndarray:
        """0/1 value of every x variable (creation order) for an assignment."""
        n_w = len(self.per_worker)
        held = np.fromiter((a * n_w + w for a, ws in enumerate(assign) for w in ws), dtype=np.int64)
        return np.isin(self.var_adapter * n_w + self.var_worker, held).astype(np.int64)

    def excess_of(self, assign: Assignment) -> int:
        """The model's anti-affinity excess for an assignment (candidate node groups only, as the e variables)."""
        values = self.values(assign)
        return sum(max(0, int(values[group].sum()) - 1) for group in self.excess_groups)

    def hint(self, assign: Assignment) -> None:
        """Replace the model's hint by a complete assignment (x, M and e all hinted, so CP-SAT can use it at once).

        Written straight into the proto in two bulk extends: add_hint per variable costs ~4 us, 0.7 s at 10000x256."""
        values = self.values(assign)
        self.model.clear_hints()
        h = self.model.proto.solution_hint
        h.vars.extend(self.var_index.tolist())
        h.values.extend(values.tolist())
        # Rounded shares can put a placement's integer max a few units under floor(bound * scale): clamp into M's domain.
        self.model.add_hint(self.max_load, min(self.ub_int, max(self.lb_int, self.int_max_load(assign))))
        for e, group in zip(self.excess, self.excess_groups, strict=True):
            self.model.add_hint(e, max(0, int(values[group].sum()) - 1))
        if self.overs:  # spread variables exist (phase 2): hint them too, or CP-SAT must complete the hint itself
            loads = int_loads(self.int_base, self.int_share, assign)
            for w, o in self.overs:
                self.model.add_hint(o, max(0, int(loads[w]) - self.spread_mean))

    def moved_expr(self, problem: Problem) -> cp_model.LinearExpr:
        """KiB loaded onto workers that do not hold the adapter now."""
        vs, ks = [], []
        for v, a, w in zip(self.x_vars, self.var_adapter.tolist(), self.var_worker.tolist(), strict=True):
            if w not in problem.current[a]:
                vs.append(v)
                ks.append(int(problem.size_kib[a]))
        return cp_model.LinearExpr.weighted_sum(vs, ks)

    def spread_expr(self) -> cp_model.LinearExpr:
        """Sum over workers of their integer load above the fleet mean: a linear measure of imbalance below the max.

        The max-load objective alone leaves every placement with the same maximum equal, e.g. an idle worker next to
        one holding two adapters; this term (used last, see solver.py) prefers the even one.
        """
        m = self.model
        mean = self.target_total // max(1, len(self.per_worker))
        self.spread_mean = mean
        overs = self.overs
        for w, pos in enumerate(self.per_worker):
            if not pos:
                continue
            o = m.new_int_var(0, max(0, self.ub_int - mean), "")
            shares = self.int_share[self.var_adapter[pos]].tolist()
            load = cp_model.LinearExpr.weighted_sum([self.x_vars[i] for i in pos], shares)
            m.add(load - o <= mean - int(self.int_base[w]))
            overs.append((w, o))
        return cp_model.LinearExpr.sum([o for _, o in overs])

    def placed_expr(self, problem: Problem) -> cp_model.LinearExpr:
        """Priority-weighted placed replicas (for the soft, capacity-starved case). An adapter's first replica is worth
        more than all extra replicas together, so capacity serves every adapter once before any adapter twice."""
        m = self.model
        first_weight = len(self.x_vars) + 1
        by_adapter: dict[int, list[int]] = {}
        for i, a in enumerate(self.var_adapter.tolist()):
            by_adapter.setdefault(a, []).append(i)
        vs: list[cp_model.IntVar] = []
        ks: list[int] = []
        for a, pos in by_adapter.items():
            weight = max(1, problem.adapters[a].priority + 1)
            served = m.new_bool_var("")
            m.add(cp_model.LinearExpr.sum([self.x_vars[i] for i in pos]) >= served)
            vs.append(served)
            ks.append(weight * first_weight)
            vs.extend(self.x_vars[i] for i in pos)
            ks.extend([weight] * len(pos))
        return cp_model.LinearExpr.weighted_sum(vs, ks)


def int_loads(int_base: np.ndarray, int_share: np.ndarray, assign: Assignment) -> np.ndarray:
    """Integer (scaled) worker loads of an assignment, as the model counts them."""
    ads, ws = flatten(assign)
    return int_base + np.bincount(ws, weights=int_share[ads], minlength=int_base.size).round().astype(np.int64)


def int_max_load(int_base: np.ndarray, int_share: np.ndarray, assign: Assignment) -> int:
    """Max integer (scaled) worker load of an assignment, as the model counts it."""
    return int(int_loads(int_base, int_share, assign).max(initial=0))


def build_model(
    problem: Problem, cands: list[list[int]], lb_int: int, hint: Assignment, soft: bool, anti_affinity: bool
) -> PlacementModel:
    """Build the model (see module docstring). M lies in [lb_int, the hint's max load]: a valid lower bound and the
    load of a known solution (or a load no placement can exceed, see below)."""
    m = cp_model.CpModel()
    int_share = problem.int_share()
    int_base = problem.int_base()
    ub_int = max(lb_int, int_max_load(int_base, int_share, hint))
    # The hint's max load bounds the optimum only when balance is the first objective. When placing more replicas
    # (soft) or fewer anti-affinity violations come first, the better placement may be more loaded than the hint:
    # then use a load no worker can exceed.
    if soft or (anti_affinity and int(problem.replicas.max(initial=0)) >= 2):
        ub_int = max(ub_int, int(int_base.max(initial=0)) + int((int_share * problem.replicas).sum()))
    x_vars: list[cp_model.IntVar] = []
    var_a: list[int] = []
    var_w: list[int] = []
    per_worker: list[list[int]] = [[] for _ in range(problem.num_workers)]
    excess: list[cp_model.IntVar] = []
    groups: list[list[int]] = []
    excess_floor = 0
    for a, ws in enumerate(cands):
        r = int(problem.replicas[a])
        if r == 0 or not ws:
            continue
        start = len(x_vars)
        vs = [m.new_bool_var("") for _ in ws]
        x_vars.extend(vs)
        var_a.extend([a] * len(ws))
        var_w.extend(ws)
        for i, w in enumerate(ws):
            per_worker[w].append(start + i)
        if soft:
            m.add(cp_model.LinearExpr.sum(vs) <= r)
        elif r == 1:
            m.add_exactly_one(vs)
        else:
            m.add(cp_model.LinearExpr.sum(vs) == r)
        if anti_affinity and r >= 2:
            by_node: dict[int, list[int]] = {}
            for i, w in enumerate(ws):
                by_node.setdefault(int(problem.node[w]), []).append(start + i)
            excess_floor += max(0, r - len(by_node))
            for pos in by_node.values():
                if len(pos) >= 2:
                    e = m.new_int_var(0, min(len(pos), r) - 1, "")
                    m.add(cp_model.LinearExpr.sum([x_vars[i] for i in pos]) - 1 <= e)
                    excess.append(e)
                    groups.append(pos)
    max_load = m.new_int_var(lb_int, ub_int, "M")
    var_adapter = np.asarray(var_a, dtype=np.int64)
    for w, pos in enumerate(per_worker):
        if not pos:
            continue
        vs = [x_vars[i] for i in pos]
        ads = var_adapter[pos]
        if len(pos) > problem.slots[w]:
            m.add(cp_model.LinearExpr.sum(vs) <= int(problem.slots[w]))
        sizes = problem.size_kib[ads]
        if int(sizes.sum()) > problem.mem_kib[w]:
            m.add(cp_model.LinearExpr.weighted_sum(vs, sizes.tolist()) <= int(problem.mem_kib[w]))
        m.add(cp_model.LinearExpr.weighted_sum(vs, int_share[ads].tolist()) - max_load <= -int(int_base[w]))
    return PlacementModel(
        model=m,
        var_adapter=var_adapter,
        var_worker=np.asarray(var_w, dtype=np.int64),
        var_index=np.asarray([v.index for v in x_vars], dtype=np.int64),
        x_vars=x_vars,
        max_load=max_load,
        excess=excess,
        excess_groups=groups,
        int_share=int_share,
        int_base=int_base,
        per_worker=per_worker,
        target_total=int(int_base.sum() + (int_share * problem.replicas).sum()),
        excess_floor=excess_floor,
        ub_int=ub_int,
        lb_int=lb_int,
    )
