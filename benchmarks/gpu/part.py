"""What a part of the GPU check runs with, in its worker process: the device, the dry-run flag, a soft
deadline, and a result saved to disk after every case (a part killed at its time box keeps what it
finished)."""
import json
import time
from pathlib import Path

import torch

from benchmarks.measure import median_seconds, peak_memory, reset_peak_memory, synchronize


class Part:
    def __init__(self, name: str, dry: bool, deadline: float, result_path: Path):
        self.name, self.dry, self.deadline, self.path = name, dry, deadline, result_path
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        if not dry and self.device.type != "cuda":
            raise RuntimeError("no CUDA device: run the GPU check on a GPU machine, or pass --dry-run")
        self.result: dict = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)

    def sync(self) -> None:
        synchronize(self.device)

    def timed(self, step, reps: int, max_s: float) -> float:
        return median_seconds(step, self.device, reps, max_s)

    def reset_peak(self) -> int:
        return reset_peak_memory(self.device)

    def peak_gb(self, base: int = 0) -> float | None:
        peak = peak_memory(self.device, base)
        return None if peak is None else round(peak / 1e9, 3)


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"
