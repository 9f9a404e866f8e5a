"""Parts for the GPU check's orchestration tests (tests/benchmarks/test_gpu_check.py): real functions
run by the check's real worker processes: one that measures, one that raises, one whose process dies,
one that overruns its box."""
import os
import time


def measure(part) -> None:
    part.result["value"] = 42
    part.save()


def fail(part) -> None:
    part.result["finished_case"] = 1
    part.save()
    raise ValueError("broken on purpose")


def crash(part) -> None:
    part.result["finished_case"] = 1
    part.save()
    os._exit(3)  # as a segfault or the kernel's OOM killer would: no exception, no result marked done


def overrun(part) -> None:
    time.sleep(120)  # far past any box the tests give it
