"""Adapter placement (pure, no kube imports): CP-SAT over candidate sets with greedy hint/fallback, and the move diff."""

from lorafleet.operator.placement.diff import diff
from lorafleet.operator.placement.solver import solve
from lorafleet.operator.placement.types import Adapter, Move, PlacementParams, PlacementResult, PlacementStatus, Worker

__all__ = ["Adapter", "Move", "PlacementParams", "PlacementResult", "PlacementStatus", "Worker", "diff", "solve"]
