"""Time points on the model's device: the one clock behind `RunStats`' times.

CPU: `time.perf_counter`. CUDA: events recorded on the current stream (`torch.cuda.Event(enable_timing=True)`), so
marking a point never waits for the GPU; durations are read once, after the call, when the last event has completed
(`Span.seconds`). A span's time is then the GPU's own time between the two points, not the host's launch time.
"""

from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def now(self):
        """A time point: a recorded CUDA event, or perf_counter seconds."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds from point `start` to point `end` (CUDA: waits for `end` to complete)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


class Spans:
    """A sum of (start, end) spans of one clock, read when asked (`seconds`): the in-LLM strategy work of a call
    is booked per hook without waiting for the device."""

    def __init__(self, clock: Clock):
        self.clock, self._spans = clock, []

    def add(self, start) -> None:
        """Book the span from `start` to now."""
        self._spans.append((start, self.clock.now()))

    @property
    def seconds(self) -> float:
        return sum(self.clock.seconds(a, b) for a, b in self._spans)
