"""Which rank holds the others back: every logging interval each rank's own step time and data wait are
all-gathered (one all_gather of two floats per rank) and summarised for the metrics line.

A rank's own step time is its wall time per step less the time it waited at the gradient reduction
(engine.reduction_wait_s): synchronous data parallelism makes every rank's wall time that of the
slowest, so only the time before the reduction tells the ranks apart. With the DeepSpeed engine that
wait is not separated (it reduces inside its backward), and with pipeline stages the stages' own waits
for activations count as their time.
"""
import statistics

import torch
import torch.distributed as dist


def straggler_metrics(step_s: float, data_wait_s: float, device: torch.device) -> dict:
    """This rank's (own step time, data wait) per step over the interval -> the world's summary.
    Every rank must call it at the same step (it is a collective)."""
    local = torch.tensor([step_s, data_wait_s], dtype=torch.float64, device=device)
    gathered = torch.empty(dist.get_world_size() * 2, dtype=torch.float64, device=device)  # flat: gloo wants it so
    dist.all_gather_into_tensor(gathered, local)
    step_times, data_waits = gathered.view(-1, 2).T.tolist()
    slowest = max(range(len(step_times)), key=step_times.__getitem__)
    return {"perf/step_s_max": step_times[slowest], "perf/step_s_median": statistics.median(step_times),
            "perf/data_wait_s_max": max(data_waits), "perf/slowest_rank": slowest}
