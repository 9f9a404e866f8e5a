"""Run logging: console progress bar, metrics.jsonl, and wandb (offline unless asked otherwise)."""
import json
import os
import sys
import time

from tqdm import tqdm

from .config import RunConfig


def model_tflops_per_device(flops_per_token: float, tokens_per_s: float, devices: int) -> float:
    """Model TFLOP/s each device delivers: the model FLOPs of the tokens trained per second (all
    devices together), shared evenly. MFU is this over the device's peak (logging.peak_tflops)."""
    return flops_per_token * tokens_per_s / devices / 1e12


class MetricsLogger:
    """Writes only on the logging rank; other ranks get a logger that does nothing."""

    def __init__(self, config: RunConfig, enabled: bool, start_step: int):
        self.enabled = enabled
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(config.run_dir / "metrics.jsonl", "a", buffering=1)
        # tqdm redraws its line with carriage returns: only on a terminal; a log file gets the trainer's
        # plain line per logging interval instead (Trainer.train prints them when there is no bar)
        if config.logging.progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=config.train.max_steps, initial=start_step, desc=config.run_name,
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        if config.logging.wandb != "disabled":
            mode = config.logging.wandb
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                raise RuntimeError("logging.wandb is 'online' but WANDB_API_KEY is not set; set the key or "
                                   "use --logging.wandb offline")
            import wandb

            self.wandb_run = wandb.init(
                project=config.logging.wandb_project, name=config.run_name, id=config.run_name.replace("/", "-"),
                dir=str(config.run_dir), mode=mode, config=config.to_dict(), resume="allow",
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def advance(self, steps: int, summary: dict) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(summary, refresh=False)

    def print(self, message: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(message)
            else:  # flushed: a log file or pipe shows each line when it happens
                print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
