"""The in-training hook: `evaluate_tasks` on two data-parallel ranks (gloo) returns, on every rank, the
numbers of a single-process evaluation."""
import json

import pytest
import torch.multiprocessing as mp

TASK = "prompt\tanswer\tlag\n" + "".join(f"{'ab'[i % 2]}{i:03d}\t{'xy'[i % 2]}\t{i % 3}\n" for i in range(7)) \
    + "".join(f"q{i}\t{'pq'[i % 2]}{i}\t{i % 2}\n" for i in range(5))


def _worker(rank: int, world: int, port: int, files: list[str], out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.evaluate import evaluate_tasks, load_tasks
    from tests.evaluate.test_scoring import tiny_model

    model = tiny_model("sessa")  # megatron state on top of the 2-rank world: TP = PP = 1, DP = 2
    model.train()
    tasks = load_tasks(files, separator="<|sep|>")
    results = evaluate_tasks(model, load_tokenizer("chars"), tasks, dp_rank=rank, dp_size=world)
    assert model.training  # restored
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    from tests.pretrain.conftest import _free_port

    (tmp_path / "classify.tsv").write_text(TASK.split("q0")[0])
    (tmp_path / "generate.tsv").write_text("prompt\tanswer\tlag\n" + "q0" + TASK.split("q0")[1])
    files = [str(tmp_path / "classify.tsv"), str(tmp_path / "generate.tsv")]
    mp.start_processes(_worker, args=(2, _free_port(), files, str(tmp_path / "dp")), nprocs=2, start_method="spawn")
    mp.start_processes(_worker, args=(1, _free_port(), files, str(tmp_path / "one")), nprocs=1, start_method="spawn")
    single = json.loads((tmp_path / "one.0").read_text())
    ranks = [json.loads((tmp_path / f"dp.{r}").read_text()) for r in range(2)]
    assert single.keys() == {"classify", "generate"} and single["classify"]["count"] == 7
    assert single["generate"]["count"] == 5 and set(single["generate"]["buckets"]["lag"]) == {"0", "1"}
    assert ranks[0] == ranks[1] == single  # ratios of integer sums: exact
