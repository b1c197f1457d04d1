"""Time the phases of one call: a mark at each phase's end, CUDA events on a GPU, perf_counter on a CPU.

    timer = PhaseTimer(device); timer.start(); ...; timer.mark("dispatch"); ...; timer.stop()
    timer.phases_ms() -> {"dispatch": 1.2, ..., "total": 3.4}

Events are recorded on the current stream, so a phase's time is from the previous mark to this one
as the stream executes them (a host sync inside a phase, like reading split sizes, is included).
"""
from __future__ import annotations

import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def stop(self) -> None:
        self.mark("end")

    def phases_ms(self) -> dict[str, float]:
        """Each named phase's time and "total" (start to stop); synchronizes on CUDA."""
        if self.device.type == "cuda":
            self._marks[-1][1].synchronize()
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            elapsed = lambda a, b: (b - a) * 1e3  # noqa: E731
        phases = {}
        for (_, before), (name, after) in zip(self._marks, self._marks[1:]):
            if name != "end":
                phases[name] = elapsed(before, after)
        phases["total"] = elapsed(self._marks[0][1], self._marks[-1][1])
        return phases
