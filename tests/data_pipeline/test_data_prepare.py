"""prepare: readers, packing, reproducible shards, manifest counts and checksums, the CLI."""

import gzip
import hashlib
import json
import lzma
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.__main__ import main
from data_pipeline.manifest import read_manifest
from data_pipeline.packing import SequencePacker, decode_entry, doc_ids, encode_entry
from data_pipeline.prepare import prepare
from data_pipeline.readers import iter_documents
from dp_helpers import expected_streams, make_documents, prepare_small, read_split, write_jsonl


def stream_from_samples(samples) -> list[int]:
    """Undo packing: consecutive samples overlap by one token; padding is cut off."""
    out = []
    for i, (tokens, n_valid, _) in enumerate(samples):
        out += tokens[:n_valid].tolist()[0 if i == 0 else 1:]
    return out


def test_packing_loses_no_token_and_records_boundaries(tmp_path):
    out, docs = prepare_small(tmp_path)
    expected = expected_streams(docs)
    manifest = read_manifest(out)
    for split in ("train", "val"):
        samples = read_split(out, split)
        assert stream_from_samples(samples) == expected[split]
        assert all(len(t) == 17 for t, _, _ in samples)
        assert all(n == 17 for _, n, _ in samples[:-1]) and 2 <= samples[-1][1] <= 17
        assert manifest["splits"][split]["stream_tokens"] == len(expected[split])
        # boundaries: a document starts at 0 or right after an EOT the packer inserted
        stream_pos, eot = 0, 4095
        for i, (tokens, n_valid, starts) in enumerate(samples):
            after_eot = [p for p in range(1, n_valid) if tokens[p - 1] == eot]
            assert [int(s) for s in starts if s > 0] == after_eot
            begins_doc = stream_pos == 0 or expected[split][stream_pos - 1] == eot
            assert (0 in starts.tolist()) == begins_doc
            stream_pos += 16


@pytest.mark.parametrize("lengths", [[16], [15], [1], [3, 4, 5, 30, 1, 1], [47], [48]])
def test_packer_edge_cases(lengths):
    packer = SequencePacker(seq_len=16, eot_id=99)
    docs = [np.arange(1, n + 1, dtype=np.uint32) + 100 * i for i, n in enumerate(lengths)]
    samples = [s for d in docs for s in packer.add(d)] + list(packer.finish())
    stream = [t for d in docs for t in [*d.tolist(), 99]]
    assert stream_from_samples([(s.tokens, s.n_valid, np.array(s.starts)) for s in samples]) == stream
    assert len(samples) == -(-(len(stream) - 1) // 16)  # every target position exactly once
    tokens, bounds = decode_entry(**dict(zip(("tokens_bytes", "docs_bytes"), encode_entry(samples).values())),
                                  sample_len=17, vocab_size=100 * len(lengths) + 100)
    assert [(n, b.tolist()) for n, b in bounds] == [(s.n_valid, list(s.starts)) for s in samples]
    last = samples[-1]
    ids = doc_ids(last.n_valid, np.array(last.starts, dtype=np.uint32), 17)
    assert (ids[last.n_valid:] == -1).all() and (ids[:last.n_valid] >= 0).all()


def test_rerun_is_byte_identical_and_manifest_is_right(tmp_path):
    out, _ = prepare_small(tmp_path, name="a")
    again, _ = prepare_small(tmp_path, name="b")
    manifest = read_manifest(out)
    assert manifest["splits"] == read_manifest(again)["splits"]
    assert len(manifest["splits"]["train"]["shards"]) >= 3  # the test really spans shards
    for split, info in manifest["splits"].items():
        assert info["samples"] == sum(s["samples"] for s in info["shards"]) == len(read_split(out, split))
        for shard in info["shards"]:
            data = (out / shard["path"]).read_bytes()
            assert data == (again / shard["path"]).read_bytes()
            assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
            with tarfile.open(out / shard["path"]) as tar:
                members = tar.getmembers()
            assert len(members) == 2 * shard["entries"] and all(m.mtime == 0 for m in members)
        assert info["tokens"] == sum(n for _, n, _ in read_split(out, split))
    assert manifest["documents"]["total"] == 60 and manifest["skipped"] == {}
    assert (manifest["seq_len"], manifest["sample_len"], manifest["samples_per_entry"]) == (16, 17, 4)


@pytest.mark.slow
def test_parallel_tokenisation_gives_the_same_shards(tmp_path):
    one, _ = prepare_small(tmp_path, name="one", n_docs=300, num_workers=1)
    two, _ = prepare_small(tmp_path, name="two", n_docs=300, num_workers=2)
    assert (one / "manifest.json").read_text() == (two / "manifest.json").read_text().replace("two.jsonl", "one.jsonl")
    for path in sorted(p.relative_to(one) for p in one.rglob("*.tar")):
        assert (one / path).read_bytes() == (two / path).read_bytes()


def test_readers_jsonl_compressed_text_dirs_parquet(tmp_path):
    docs = make_documents(6)
    write_jsonl(tmp_path / "a.jsonl", docs[:2], field="content")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps({"content": docs[2]}) + "\n\n").encode()))
    (tmp_path / "c.jsonl.xz").write_bytes(lzma.compress((json.dumps({"content": docs[3]}) + "\n").encode()))
    pq.write_table(pa.table({"content": [docs[4]]}), tmp_path / "d.parquet")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "e.md").write_text(docs[5])
    (tmp_path / "texts" / ".hidden.txt").write_text("not me")
    (tmp_path / "texts" / "image.png").write_bytes(b"\x89PNG")
    got = list(iter_documents([str(tmp_path)], text_field="content"))
    assert [d.text for d in got] == docs
    assert got[0].where.endswith("a.jsonl:1") and got[4].where.endswith("d.parquet:row 0")


def test_builtin_corpus_reads():
    first = next(iter_documents("builtin"))
    assert first.where.endswith("python311_docs.jsonl.xz:1") and "Python" in first.text


def test_cli_prepare_and_inspect(tmp_path, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", make_documents(40))
    out = tmp_path / "out"
    args = ["prepare", "--source", str(source), "--tokenizer", "pydocs4k", "--seq-len", "32", "--out", str(out),
            "--workers", "1", "--val-fraction", "0.25", "--no-progress"]
    assert main(args) == 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(args)
    assert main(args + ["--overwrite"]) == 0
    assert main(["inspect", str(out), "--verify", "--show", "1"]) == 0
    printed = capsys.readouterr().out
    assert "verify: OK" in printed and "document(s)" in printed and "pydocs4k-5cd72dae532c" in printed
    shard = out / read_manifest(out)["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(out), "--verify"]) == 1
    assert "does not match" in capsys.readouterr().out


@pytest.mark.slow
def test_builtin_source_prepares(tmp_path):
    manifest = prepare("builtin", "pydocs4k", 1024, tmp_path / "d", num_workers=1, progress=False)
    assert manifest["documents"]["total"] == 497
    assert manifest["splits"]["val"]["samples"] > 0 and manifest["splits"]["train"]["samples"] > 2500
    assert manifest["sources"][0]["source"] == "builtin"


def test_tokenising_progress_only_on_a_terminal(monkeypatch):
    """A log file gets the summary lines, not tqdm's carriage-return frames; a terminal gets the bar."""
    import io
    import os

    from data_pipeline.prepare import _progress_bar

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _progress_bar(True) is None
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr("sys.stderr", terminal)
        bar = _progress_bar(True)
        assert bar is not None and _progress_bar(False) is None
        bar.close()
    os.close(leader)
