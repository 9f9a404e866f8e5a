"""Fixtures: tiny trained runs (Sessa and Transformer++, 3 steps each through `python -m pretrain`),
the Sessa run's HF export, and small task files."""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain.conftest import REPO, pretrain_env, run_pretrain


def evaluate_cli(*args, expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pretrain.evaluate", *map(str, args)], cwd=REPO,
                          env=pretrain_env() | (env or {}), capture_output=True, text=True, timeout=600)
    if expect_ok and done.returncode != 0:
        raise AssertionError(f"pretrain.evaluate failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}")
    return done


def wandb_history(wandb_dir: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history row of the one offline wandb run under `wandb_dir`, read
    from its .wandb file: wandb's record protobufs in LevelDB log framing (32 KiB blocks, each chunk
    a 7-byte header: crc32, length, type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4) after a 7-byte file
    header. wandb 0.31 ships no reader for it; the internal keys (_step, _runtime, _timestamp) are left out."""
    from wandb.proto.wandb_internal_pb2 import Record

    [path] = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    rows, position, block, chunks = [], 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record.FromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item}
                rows.append((items.pop("_step"), {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


@pytest.fixture(scope="session")
def runs(tiny_run) -> dict:
    """{"data", "sessa", "transformer", "hf"}: the session's tiny Sessa run and its HF export
    (tests/conftest.py tiny_run, trained on a private copy of the pydocs data, so a test may hide it),
    and a Transformer++ run of the same recipe beside it."""
    run_pretrain(tiny_run["recipe"], "--run_name", "transformer", "--model.arch", "transformer")
    return {"data": tiny_run["data"], "sessa": tiny_run["run"], "transformer": tiny_run["run"].with_name("transformer"),
            "hf": tiny_run["hf"], "tmp": tiny_run["tmp"]}


@pytest.fixture
def hidden_data(runs):
    """The training data moved away for the duration of a test (a target whose tokenizer is unknown)."""
    away = runs["data"].with_name("moved-away")
    shutil.move(runs["data"], away)
    try:
        yield
    finally:
        shutil.move(away, runs["data"])


CLASSIFY = "Text\tAnswer\tlag\nthe cat sat\tyes\t1\nthe dog ran\tno\t2\na bird flew\tyes\t1\na fish swam\tno\t2\n"
GENERATE = ("prompt\tanswer\tlength\ndef f(x):\treturn x\t1\nimport os\tos.path\t2\n"
            "\"quoted\ttab\"\t\"two\nlines\"\t2\n")


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    (tmp_path / "classify.tsv").write_text(CLASSIFY)
    (tmp_path / "generate.tsv").write_text(GENERATE)
    docs = ["def f(x):\n    return x * 2\n" * 150, "The quick brown fox jumps over the lazy dog. " * 5]  # ~1.5k, ~60 tokens
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"classify": tmp_path / "classify.tsv", "generate": tmp_path / "generate.tsv", "docs": tmp_path / "docs.jsonl"}
