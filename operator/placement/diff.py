"""From the current placement to a new one as an ordered list of moves that never leaves an adapter unserved.

Each Move is executed as "load on `add`, route to it, then unload `remove`", so a paired move keeps the adapter's
replica count. Order:
  1. pure removes (scale-down, deleted or evicted adapters): they only free capacity, and an adapter that still has
     replicas in the new placement keeps at least one (a kept one, or the source of one of its paired moves, which
     is removed only after its target is loaded);
  2. paired moves and pure adds, each taken as soon as its target has a free slot (and memory, when sizes are
     given), so a full worker is drained by its outgoing moves before something new lands on it. If a cycle of full
     workers blocks every remaining step, the rest follows in name order and the executor must wait for room.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lorafleet.operator.placement.types import Move, Worker


def diff(
    current: Mapping[str, Iterable[str]],
    new: Mapping[str, Iterable[str]],
    workers: list[Worker] | None = None,
    sizes: Mapping[str, int] | None = None,
) -> list[Move]:
    """Moves turning `current` into `new` (adapter -> workers), ordered as the module docstring says."""
    removes: list[Move] = []
    steps: list[Move] = []
    for name in sorted(set(current) | set(new)):
        cur, nxt = set(current.get(name, ())), set(new.get(name, ()))
        adds, drops = sorted(nxt - cur), sorted(cur - nxt)
        pairs = min(len(adds), len(drops))
        steps += [Move(name, adds[i], drops[i]) for i in range(pairs)]
        steps += [Move(name, w, None) for w in adds[pairs:]]
        removes += [Move(name, None, w) for w in drops[pairs:]]
    if workers is None:
        return removes + steps
    return removes + _by_room(steps, current, removes, workers, sizes or {})


def _by_room(
    steps: list[Move],
    current: Mapping[str, Iterable[str]],
    removes: list[Move],
    workers: list[Worker],
    sizes: Mapping[str, int],
) -> list[Move]:
    """Order steps so each add lands on a worker with room, simulating slots and memory as moves complete."""
    slots = {w.name: w.slots for w in workers}
    mem = {w.name: w.memory_bytes for w in workers}
    for name, ws in current.items():
        for w in ws:
            slots[w] = slots.get(w, 0) - 1
            mem[w] = mem.get(w, 0) - sizes.get(name, 0)
    for m in removes:
        slots[m.remove] += 1
        mem[m.remove] += sizes.get(m.adapter, 0)
    ordered: list[Move] = []
    pending = list(steps)
    while pending:
        for i, m in enumerate(pending):  # noqa: B007 (i is used after the loop)
            if slots.get(m.add, 0) >= 1 and mem.get(m.add, 0) >= sizes.get(m.adapter, 0):
                break
        else:
            return ordered + pending  # blocked by a cycle of full workers
        m = pending.pop(i)
        slots[m.add] -= 1
        mem[m.add] -= sizes.get(m.adapter, 0)
        if m.remove is not None:
            slots[m.remove] = slots.get(m.remove, 0) + 1
            mem[m.remove] = mem.get(m.remove, 0) + sizes.get(m.adapter, 0)
        ordered.append(m)
    return ordered
