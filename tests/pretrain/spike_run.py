"""`python -m pretrain` whose training data is doctored at chosen global batches, for
tests/pretrain/test_spikes.py: the loader's global batch N is read and replaced by one from another
prepared dataset (`replace:N:DIR`, a bad source mixed in at one point), or global batches A..B are
read and never delivered (`drop:A-B`, a loader that never saw them). Counted from 1 over this
process's reads: use it on fresh runs only.

    python tests/pretrain/spike_run.py replace:8:/data/random --config recipe.yaml [--a.b v ...]
"""
import sys

import pretrain.__main__
import pretrain.loop
from data_pipeline.loader import build_dataloader


class DoctoredLoader:
    """The trainer's loader (state, close, ...) with its global batches replaced or dropped."""

    def __init__(self, loader, microbatches: int, replace: dict, drop: range):
        self.loader, self.microbatches, self.replace, self.drop = loader, microbatches, replace, drop

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        clean, number = iter(self.loader), 0
        while True:
            number += 1
            batch = [next(clean) for _ in range(self.microbatches)]
            if number in self.drop:
                continue
            yield from (next(self.replace[number]) for _ in batch) if number in self.replace else batch


def main(doctoring: str, argv: list[str]) -> int:
    build = pretrain.loop.Trainer.__init__
    kind, _, what = doctoring.partition(":")

    def init_doctored(trainer, config):
        build(trainer, config)
        replace, drop = {}, range(0)
        if kind == "replace":
            number, _, bad_dir = what.partition(":")
            bad = build_dataloader(bad_dir, "train", config.train.micro_batch_size, 0, 1, 0, config.data.seed,
                                   infinite=True, expected_tokenizer_id=trainer.tokenizer_id)
            replace = {int(number): iter(bad)}
        else:
            first, _, last = what.partition("-")
            drop = range(int(first), int(last) + 1)
        trainer.train_loader = DoctoredLoader(trainer.train_loader, trainer.num_microbatches, replace, drop)

    pretrain.loop.Trainer.__init__ = init_doctored
    return pretrain.__main__.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
