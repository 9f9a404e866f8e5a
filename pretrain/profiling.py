"""torch.profiler traces of chosen training steps on chosen ranks (`profile.steps`, `profile.ranks`):

    python -m pretrain --config configs/tiny.yaml --profile.steps 10-12 --profile.ranks 0

writes, per traced rank R, under runs/NAME/profile/:
    rank-R.json.gz        Chrome/Perfetto trace (ui.perfetto.dev, chrome://tracing); step N of the log is
                          the range ProfilerStep#N, inside it the ranges of model/profile_ranges.py
    rank-R.memory.pickle  on CUDA: the caching allocator's history over those steps (pytorch.org/memory_viz)
"""
import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .config import ProfileConfig

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept for the snapshot (torch's own example uses this)


class StepProfiler:
    def __init__(self, config: ProfileConfig, rank: int, run_dir: Path, device: torch.device):
        span = config.step_range()
        self.span = span if span is not None and config.traces_on(rank) else None
        self.trace_path = run_dir / "profile" / f"rank-{rank}.json.gz"
        self.memory_path = run_dir / "profile" / f"rank-{rank}.memory.pickle"
        self.cuda = device.type == "cuda"
        self.profiler = None

    @contextlib.contextmanager
    def step(self, step: int):
        """Around training step `step` (1-based): traced when it lies in profile.steps."""
        if self.span is None or not self.span[0] <= step <= self.span[1]:
            yield
            return
        if self.profiler is None:
            self._start()
        with record_function(f"ProfilerStep#{step}"):
            yield
        if step == self.span[1]:
            self.finish()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self.profiler.start()

    def finish(self) -> None:
        """Stop and write the files; also when training ends (or stops) inside the span."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace_path))  # gzipped: the name ends in .gz
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.memory_path))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler = None
