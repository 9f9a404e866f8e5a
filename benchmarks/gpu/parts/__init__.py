"""The parts of the GPU check, in the order they run. Each is a function `run(part, *args)` in a module
of this package, started in a worker process of its own on a GPU (a failure or an out-of-memory leaves
the next part a clean device) with its own time box."""
from dataclasses import dataclass


@dataclass(frozen=True)
class PartSpec:
    section: str  # its key in gpu.json; parts sharing one (the runs of part d) are listed together
    gpu_s: float  # time box on the GPU
    dry_s: float  # time box in a dry run (CPU, Triton interpreter)
    function: str  # "module:function", called as function(part, *args) in the worker
    args: tuple = ()


# The GPU boxes add up to 7 minutes; run.sh's wheel install and each process's start come on top,
# within the 8 minutes of a GPU window.
PARTS = {
    "env": PartSpec("env", 20, 120, "benchmarks.gpu.parts.env:run"),
    "a": PartSpec("a_correctness", 100, 300, "benchmarks.gpu.parts.correctness:run"),
    "b": PartSpec("b_solve_vs_sdpa", 75, 200, "benchmarks.gpu.parts.solve_vs_sdpa:run"),
    "c": PartSpec("c_long_layer", 55, 200, "benchmarks.gpu.parts.long_layer:run"),
    "d1": PartSpec("d_train_step", 40, 200, "benchmarks.gpu.parts.train_step:run", ("125m", "sessa")),
    "d2": PartSpec("d_train_step", 35, 200, "benchmarks.gpu.parts.train_step:run", ("125m", "transformer")),
    "d3": PartSpec("d_train_step", 55, 200, "benchmarks.gpu.parts.train_step:run", ("1.3b", "sessa")),
    "d4": PartSpec("d_train_step", 40, 200, "benchmarks.gpu.parts.train_step:run", ("1.3b", "transformer")),
}
