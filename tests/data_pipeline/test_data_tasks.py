"""Supervised task data: task files (TSV/CSV/JSONL), loss masks in shards and batches, packing
modes, the chars tokenizer and the seeded document shuffle."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from data_pipeline.__main__ import main
from data_pipeline.errors import DataError
from data_pipeline.loader import build_dataloader
from data_pipeline.prepare import TaskSpec, document_order, prepare
from data_pipeline.tasks import (closed_label_set, encode_example, encode_prompt, read_task_file,
                                 task_file_format, write_task_file)
from data_pipeline.tokenizer import load_tokenizer
from dp_helpers import batches, make_documents, prepare_small, write_jsonl

TRICKY = [  # prompts csv must quote: tabs, newlines (\n and \r\n), quotes, commas, unicode
    ("plain prompt", "yes"),
    ("tab\tinside", "no"),
    ("two\nlines\nand \"quotes\"", "yes"),
    ("comma, and\r\nwindows newline", "no"),
    ("ünïcödé ✓ 数据\t\n", "yes"),
    ("'single' and \\ backslash", "no"),
]


def _examples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["red", "green", "blue", "tab\there", "new\nline"], size=rng.integers(1, 8)))
        split = "train" if i % 5 else ("val" if i % 10 else "test")
        out.append({"Text": f"{i}: {words}", "Answer": ["yes", "no", "maybe"][i % 3], "split": split, "n": i})
    return out


def _all_samples(data_dir, split: str) -> list[dict]:
    loader = build_dataloader(data_dir, split, 4, 0, 1, 0, seed=0, infinite=False, lanes=1)
    rows = []
    for b in loader:
        for r in range(len(b["tokens"])):
            rows.append({k: b[k][r] for k in ("tokens", "doc_ids", "loss_mask", "sample_index")})
    return sorted(rows, key=lambda r: int(r["sample_index"]))


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".tsv.gz"])
def test_task_files_round_trip_embedded_newlines_and_tabs(tmp_path, suffix):
    rows = [{"Text": p, "Answer": a, "extra": str(i)} for i, (p, a) in enumerate(TRICKY)]
    path = write_task_file(tmp_path / f"t{suffix}", rows)
    if suffix in (".tsv", ".csv"):  # what csv.writer writes (our writer is csv.writer)
        with open(tmp_path / f"ref{suffix}", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
            w.writerow(["Text", "Answer", "extra"])
            w.writerows([[r["Text"], r["Answer"], r["extra"]] for r in rows])
        assert path.read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    examples = read_task_file(path, "Text", "Answer")
    assert [(e.prompt, e.answer) for e in examples] == TRICKY
    assert [e.fields["extra"] for e in examples] == [str(i) for i in range(len(TRICKY))]
    if suffix == ".tsv":  # line numbers: the line each record starts on
        assert [e.where.rsplit(":", 1)[1] for e in examples] == ["2", "3", "4", "7", "9", "11"]


def test_prepared_task_tokens_and_loss_mask_are_exact(tmp_path):
    rows = [{"Text": p, "Answer": a} for p, a in TRICKY] * 3
    src = write_task_file(tmp_path / "t.tsv", rows)
    tok = load_tokenizer("chars")
    manifest = prepare(str(src), "chars", 64, tmp_path / "d", format="task", val_fraction=0,
                       task=TaskSpec("Text", "Answer", "<|sep|>"), num_workers=1, progress=False)
    assert manifest["tokenizer_id"] == tok.id and manifest["tokenizer_id"].startswith("chars-")
    assert manifest["loss_mask"] and manifest["pack"] == "none"
    assert manifest["task"] == {"format": "tsv", "prompt_field": "Text", "answer_field": "Answer",
                                "split_field": None, "separator": "<|sep|>", "loss_on": "answer",
                                "labels": ["no", "yes"]}
    samples = _all_samples(tmp_path / "d", "train")
    assert len(samples) == len(rows)  # --pack none: one example per sample
    order = document_order(len(rows), 0, "train")
    for s, i in zip(samples, order):
        prompt, answer = rows[i]["Text"], rows[i]["Answer"]
        ids, mask_start = encode_example(tok, prompt, answer, "<|sep|>")
        n = len(ids)
        assert s["tokens"][:n].tolist() == ids.tolist()
        assert ids[len(prompt.encode())] == 257  # the <|sep|> special token, one id
        assert len(encode_prompt(tok, prompt, "<|sep|>")) == mask_start == len(prompt.encode()) + 1
        expected_mask = np.zeros(65, dtype=bool)
        expected_mask[mask_start:n] = True  # the answer and its end-of-text
        assert s["loss_mask"].numpy().tolist() == expected_mask.tolist()
        assert tok.decode(s["tokens"][mask_start:n - 1].tolist()) == answer
        assert (s["doc_ids"][:n] == 0).all() and (s["doc_ids"][n:] == -1).all()  # padding: -1
        assert s["loss_mask"].dtype == torch.bool


def test_loss_on_all_and_greedy_packing(tmp_path):
    rows = [{"q": f"question {i}" + "?" * (i % 7), "a": f"answer {i}"} for i in range(40)]
    src = write_task_file(tmp_path / "t.jsonl", rows)
    prepare(str(src), "chars", 80, tmp_path / "d", format="task", val_fraction=0, pack="greedy",
            task=TaskSpec("q", "a", " => ", "all"), num_workers=1, progress=False, shuffle_seed=None)
    samples = _all_samples(tmp_path / "d", "train")
    assert 1 < len(samples) < len(rows)  # several examples share a sample
    seen = []
    for s in samples:
        valid = s["doc_ids"] >= 0
        assert bool(s["loss_mask"][valid].all()) and not bool(s["loss_mask"][~valid].any())
        text = load_tokenizer("chars").decode(s["tokens"][valid].tolist())
        parts = text.split("<|endoftext|>")
        assert parts[-1] == ""  # every example in the sample is whole
        assert int(s["doc_ids"][valid].max()) + 1 == len(parts) - 1
        seen += parts[:-1]
    assert seen == [f"{r['q']} => {r['a']}" for r in rows]  # source order, none lost or split


def test_pack_none_isolates_examples_and_too_long_is_named(tmp_path):
    rows = [{"p": "x" * (5 + i), "a": "y"} for i in range(10)]
    src = write_task_file(tmp_path / "t.csv", rows)
    prepare(str(src), "chars", 20, tmp_path / "d", format="task", task=TaskSpec("p", "a"), val_fraction=0,
            num_workers=1, progress=False)
    for s in _all_samples(tmp_path / "d", "train"):
        assert set(s["doc_ids"].tolist()) <= {0, -1}  # one example; attention never crosses to another
        n = int((s["doc_ids"] == 0).sum())
        assert s["tokens"][n - 1] == 256 and (s["tokens"][n:] == 256).all()  # EOT, then EOT padding
    with pytest.raises(DataError, match=r"t\.csv:11: 17 tokens .* raise --seq-len to at least 16"):
        prepare(str(src), "chars", 15, tmp_path / "e", format="task", task=TaskSpec("p", "a"),
                num_workers=1, progress=False)
    m = prepare(str(src), "chars", 15, tmp_path / "e", format="task", task=TaskSpec("p", "a"), val_fraction=0,
                num_workers=1, progress=False, on_error="skip", overwrite=True)
    assert m["skipped"] == {"too_long": 1} and m["documents"]["total"] == 9


def test_split_field_and_separate_split_files(tmp_path):
    rows = _examples(50)
    src = write_task_file(tmp_path / "all.jsonl", rows)
    m = prepare(str(src), "chars", 128, tmp_path / "a", format="task", num_workers=1, progress=False,
                task=TaskSpec("Text", "Answer", split_field="split"))
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert {s: m["splits"][s]["documents"] for s in counts} == counts == {"train": 40, "val": 5, "test": 5}
    files = {s: write_task_file(tmp_path / f"{s}.tsv", [r for r in rows if r["split"] == s]) for s in counts}
    m2 = prepare(str(files["train"]), "chars", 128, tmp_path / "b", format="task", num_workers=1,
                 progress=False, task=TaskSpec("Text", "Answer"), val_sources=[str(files["val"])],
                 test_sources=[str(files["test"])])
    for s in counts:  # same examples, same order, so the same shards
        assert [x["sha256"] for x in m2["splits"][s]["shards"]] == [x["sha256"] for x in m["splits"][s]["shards"]]
    test = _all_samples(tmp_path / "b", "test")
    assert sorted(load_tokenizer("chars").decode(t["tokens"][t["doc_ids"] >= 0].tolist())
                  for t in test) == sorted(f"{r['Text']}\n{r['Answer']}<|endoftext|>" for r in rows
                                           if r["split"] == "test")


def test_masked_loader_resumes_exactly(tmp_path):
    src = write_task_file(tmp_path / "t.jsonl", _examples(120))
    prepare(str(src), "chars", 96, tmp_path / "d", format="task", task=TaskSpec("Text", "Answer"),
            val_fraction=0, num_workers=1, progress=False, entry_bytes=8 * 97 * 4, shard_bytes=3 * 8 * 97 * 4)
    ref = batches(build_dataloader(tmp_path / "d", "train", 4, 0, 1, 0, seed=3), 70)
    loader = build_dataloader(tmp_path / "d", "train", 4, 0, 1, 0, seed=3)
    first = batches(loader, 40)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = build_dataloader(tmp_path / "d", "train", 4, 0, 1, 0, seed=3)
    resumed.load_state_dict(state)
    for a, b in zip(ref, first + batches(resumed, 30), strict=True):
        for key in ("tokens", "doc_ids", "loss_mask", "sample_index", "epoch"):
            assert torch.equal(a[key], b[key]), key
    assert not bool(torch.cat([b["loss_mask"] for b in ref]).all())  # masks are really there


def test_old_shards_without_masks_load_with_all_ones(tmp_path):
    out, _ = prepare_small(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss_mask"] is False
    for key in ("loss_mask", "pack", "shuffle_seed"):  # a manifest written before these existed
        del manifest[key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for workers in (0, 1):
        b = batches(build_dataloader(out, "train", 3, 0, 1, workers, seed=0), 2)[-1]
        assert b["loss_mask"].shape == b["tokens"].shape and bool(b["loss_mask"].all())
        assert b["loss_mask"].dtype == torch.bool


def test_bad_task_input_names_file_and_line(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("Text\tAnswer\nfine\tyes\n\"two\nlines\"\tno\nmissing answer\n")
    with pytest.raises(DataError, match=r"bad\.tsv:5: row has 1 field\(s\), the header has 2"):
        read_task_file(tsv, "Text", "Answer")
    with pytest.raises(DataError, match=r"bad\.tsv:1: no column 'Label' in the header"):
        read_task_file(tsv, "Text", "Label")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"Text": "a", "Answer": "b"}\n\n{"Text": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no field 'Answer'"):
        read_task_file(jsonl, "Text", "Answer")
    jsonl.write_text('{"Text": "a", "Answer": ""}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'Answer' is empty"):
        read_task_file(jsonl, "Text", "Answer")
    jsonl.write_text('{"Text": "a", "Answer": "b", "split": "holdout"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: split 'holdout' is not one of"):
        read_task_file(jsonl, "Text", "Answer", "split")
    with pytest.raises(ValueError, match=r"unknown task file format .*'\.txt'.*use \.tsv or \.csv"):
        task_file_format(tmp_path / "x.txt")
    with pytest.raises(DataError, match=r"bad\.tsv:5"):  # through prepare and the CLI too
        main(["prepare", "--source", str(tsv), "--format", "task", "--prompt-field", "Text", "--answer-field",
              "Answer", "--tokenizer", "chars", "--seq-len", "32", "--out", str(tmp_path / "o"), "--no-progress",
              "--workers", "1"])
    with pytest.raises(SystemExit):
        main(["prepare", "--source", str(tsv), "--format", "parquet-task", "--tokenizer", "chars",
              "--seq-len", "32", "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        prepare(str(tsv), "chars", 32, tmp_path / "o3", format="csv")


def test_closed_label_set():
    assert closed_label_set(["b", "a", "b", "a"]) == ["a", "b"]
    assert closed_label_set(["x", "y", "z"]) is None  # every answer distinct: open answers
    assert closed_label_set([str(i % 100) for i in range(1000)]) is None  # more than 64 labels


def test_chars_tokenizer():
    tok = load_tokenizer("chars")
    assert tok.vocab_size == 260 and tok.eot_id == 256
    assert tok.encode("ab\tc") == [97, 98, 9, 99]
    assert tok.encode("<|sep|>") == list(b"<|sep|>")  # special-token text is plain text
    assert tok.encoding.encode_single_token("<|sep|>") == 257
    text = "ünï\n✓ " * 50
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) == len(text.encode())
    assert tok.id == load_tokenizer("chars").id == "chars-6f915a05a6db"  # pinned


def test_documents_are_shuffled_with_a_seed(tmp_path):
    docs = make_documents(60)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    tok = load_tokenizer("pydocs4k")

    def first_docs(seed):
        out = tmp_path / f"s{seed}"
        prepare(str(src), "pydocs4k", 16384, out, val_fraction=0, num_workers=1, progress=False, shuffle_seed=seed,
                overwrite=True)
        text = tok.decode(_all_samples(out, "train")[0]["tokens"].tolist())
        return [int(part.split(".")[0].split()[1]) for part in text.split("<|endoftext|>") if part.startswith("Doc")]

    assert first_docs(None) == list(range(60))  # source order
    a, b = first_docs(0), first_docs(1)
    assert sorted(a) == sorted(b) == list(range(60)) and a != b and a != list(range(60))
    assert a == document_order(60, 0, "train").tolist() == first_docs(0)
