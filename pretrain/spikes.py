"""Loss spikes (train.spike): each step's loss and gradient norm against a running window of the
steps the model kept.

The statistic (OLMo-core's stability monitor flags values some standard deviations above a rolling
mean; Megatron-LM's spiky-loss check compares the loss with the previous one): with the last W kept
values x_1 .. x_W of a signal (W = train.spike.window), mean m = sum x_i / W and population standard
deviation s = sqrt(sum (x_i - m)^2 / W), a step spikes when

    value > m + k * s        (k = train.spike.threshold)

for its loss or (train.spike.grad_norm) its gradient norm. Nothing is flagged before the window holds
W values. A step joins the windows only if its update is kept: a skipped or rolled-back spike never
raises the bar for the next one, and a loss that stays high under `log` becomes the new normal.

Actions: `log` prints a warning and counts it in the metric train/spike; `skip` also drops the
update (the engine's non-finite path); `rollback` drops it, reloads the last checkpoint and goes on
with the data after the spike, so the batches between that checkpoint and the spike are never
trained on (PaLM's remedy). The windows and every rollback travel in the checkpoint.
"""
import math
from collections import deque

from .config import SpikeConfig

SIGNALS = ("loss", "grad_norm")


class SpikeMonitor:
    def __init__(self, config: SpikeConfig):
        self.config = config
        watched = SIGNALS if config.grad_norm else SIGNALS[:1]
        self.windows = {name: deque(maxlen=config.window) for name in watched}
        self.rollbacks: list[dict] = []  # {"spike_step", "to_step", "skipped_batches": [first, last]}
        self.since_log = 0  # spikes since the last metrics line (train/spike)
        self.reasons: list[str] = []  # why the last checked step spiked; empty: it did not

    @property
    def drops_updates(self) -> bool:
        return self.config.action in ("skip", "rollback")

    def check(self, loss: float, grad_norm: float) -> bool:
        """Whether this step spikes (every rank gets the same answer: both values are all-reduced);
        with `skip` or `rollback` the engine drops the update when it does (False: keep it)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        self.reasons = []
        for name, window in self.windows.items():
            if len(window) < window.maxlen or not math.isfinite(values[name]):  # non-finite: train.nonfinite's
                continue
            mean = sum(window) / len(window)
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
            bar = mean + self.config.threshold * std
            if values[name] > bar:
                self.reasons.append(f"{name} {values[name]:.4g} > {bar:.4g} (mean {mean:.4g} + "
                                    f"{self.config.threshold:g} x std {std:.4g} over the last {len(window)} steps)")
        self.since_log += bool(self.reasons)
        return not (self.reasons and self.drops_updates)

    def keep(self, loss: float, grad_norm: float) -> None:
        """A step whose update was kept joins the windows."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for name, window in self.windows.items():
            window.append(values[name])

    def state_dict(self) -> dict:
        return {"windows": {name: list(window) for name, window in self.windows.items()},
                "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's state (None: written before train.spike existed: empty windows)."""
        state = state or {"windows": {}, "rollbacks": []}
        for name, window in self.windows.items():
            window.clear()
            window.extend(state["windows"].get(name, ()))
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
