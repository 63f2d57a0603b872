"""How a compute call's attempts are budgeted: the pool's options and the hedge budget.

A first attempt that goes unanswered for its budget gets a hedge on another
replica (``ReplicaPool.call``). The budget follows the service's recent
times, so a slow but healthy replica is not hedged and a hung one is found
in a fraction of the caller's deadline.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolOptions:
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 1.0
    refresh_s: float = 5.0
    min_refresh_s: float = 1.0
    max_attempts: int = 3
    # Hedge budget: factor x a high quantile of recent service times, per
    # second of audio (at least one), clamped to [floor, share of deadline].
    hedge_floor_s: float = 1.5
    hedge_initial_s: float = 3.0
    hedge_factor: float = 2.0
    hedge_quantile: float = 0.95
    hedge_window: int = 200
    hedge_min_samples: int = 8
    hedge_deadline_share: float = 0.5
    # An attempt is not started with less than this left before the deadline.
    min_attempt_s: float = 0.05
    # Removed replicas' channels close after this, letting their calls finish.
    close_grace_s: float = 10.0


class HedgeBudget:
    """How long an attempt may go unanswered before a hedge starts.

    Service time grows with the audio sent, so samples are kept per second
    of audio (a call of one second or less counts as one); the budget is
    ``factor`` times their ``quantile`` scaled back to the call's audio,
    never under ``floor_s`` (a healthy replica's slow tail is not hedged)
    and never over ``deadline_share`` of the call's timeout (a hedge always
    has the rest). With fewer than ``min_samples`` samples it is ``initial_s``.
    """

    def __init__(
        self,
        floor_s: float = 1.5,
        initial_s: float = 3.0,
        factor: float = 2.0,
        quantile: float = 0.95,
        window: int = 200,
        min_samples: int = 8,
        deadline_share: float = 0.5,
    ) -> None:
        self.floor_s = floor_s
        self.initial_s = initial_s
        self.factor = factor
        self.quantile = quantile
        self.min_samples = min_samples
        self.deadline_share = deadline_share
        self._samples: deque[float] = deque(maxlen=window)

    @classmethod
    def from_options(cls, options: PoolOptions) -> HedgeBudget:
        return cls(
            floor_s=options.hedge_floor_s,
            initial_s=options.hedge_initial_s,
            factor=options.hedge_factor,
            quantile=options.hedge_quantile,
            window=options.hedge_window,
            min_samples=options.hedge_min_samples,
            deadline_share=options.hedge_deadline_share,
        )

    def observe(self, seconds: float, work: float = 1.0) -> None:
        """A successful attempt took ``seconds`` for ``work`` seconds of audio."""
        self._samples.append(seconds / max(work, 1.0))

    def budget(self, timeout_s: float, work: float = 1.0) -> float:
        if len(self._samples) < self.min_samples:
            estimate = self.initial_s
        else:
            ordered = sorted(self._samples)
            index = min(len(ordered) - 1, math.ceil(self.quantile * len(ordered)) - 1)
            estimate = self.factor * ordered[max(index, 0)] * max(work, 1.0)
        return min(max(estimate, self.floor_s), timeout_s * self.deadline_share)
