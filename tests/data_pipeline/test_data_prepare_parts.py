"""prepare --part I/N and merge: pieces cut at line starts, parts that cover every document once,
a merged dataset holding exactly the documents (per split) of one prepare, the loader's exact
resume on it, and every refusal of merge."""
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline.__main__ import main
from data_pipeline.errors import DataError
from data_pipeline.loader import build_dataloader
from data_pipeline.manifest import read_manifest
from data_pipeline.merge import merge
from data_pipeline.parts import plan_pieces, read_chunks, select_part
from data_pipeline.prepare import prepare
from data_pipeline.readers import iter_documents
from data_pipeline.tokenizer import load_tokenizer
from dp_helpers import batches, make_documents, sample_ids, split_documents, write_jsonl

SMALL = dict(val_fraction=0.2, num_workers=1, progress=False, entry_bytes=4 * 17 * 4, shard_bytes=3 * 4 * 17 * 4)
PIECE = 2000  # bytes: the 31 kB test file makes 16 pieces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("parts")
    docs = make_documents(80)
    return write_jsonl(tmp / "docs.jsonl", docs), docs


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "data"
    prepare([str(corpus[0])], "pydocs4k", 16, out, piece_bytes=PIECE, **SMALL)
    return out


@pytest.fixture(scope="module")
def merged(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "data"
    for index in range(3):
        prepare([str(corpus[0])], "pydocs4k", 16, out, piece_bytes=PIECE, part=(index, 3), **SMALL)
    assert list(merge(out)) == [out]
    return out


def test_parts_read_every_document_once_whatever_the_cuts(tmp_path):
    """Cuts land everywhere (mid-line, on a newline, on a line start); blank lines, a compressed file
    (never cut) and a directory are among the sources. For every piece size and number of parts the
    parts' documents, in order, are all documents once, each in the same piece."""
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i * 7 % 23)}) for i in range(40)]
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:30]) + "\n")  # a blank line too
    folder = tmp_path / "dir"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[30:36]) + "\n")
    (folder / "b.txt").write_text("a whole text file is one document")
    write_jsonl(folder / "c.jsonl", [json.loads(line)["text"] for line in lines[36:]])
    sources = [str(big), str(folder)]
    everything = [(d.text, d.where.split(":")[0]) for d in iter_documents(sources)]
    assert len(everything) == 41
    for piece_bytes in range(37, 1400, 29):
        chunks = plan_pieces(sources, piece_bytes)
        whole = [(piece, d.text) for piece, d in read_chunks(chunks, "text", "raise", None)]
        assert [text for _, text in whole] == [text for text, _ in everything], piece_bytes
        pieces = chunks[-1].piece + 1
        for count in {c for c in (1, 2, 5, pieces) if c <= pieces}:
            parts = [select_part(chunks, index, count, piece_bytes) for index in range(count)]
            assert [p.pieces for p, _ in parts] == [(a.pieces[1] if i else 0, p.pieces[1]) for i, ((p, _), (a, _))
                                                    in enumerate(zip(parts, [parts[0]] + parts[:-1]))]
            assert all(hi > lo for (lo, hi) in (p.pieces for p, _ in parts)) and parts[-1][0].pieces[1] == pieces
            read = [(piece, d.text) for _, own in parts for piece, d in read_chunks(own, "text", "raise", None)]
            assert read == whole, (piece_bytes, count)
    chunks = plan_pieces(sources, 100)
    assert [c.end - c.start for c in chunks if c.file.path == big][:3] == [100, 100, 100]
    assert len([c for c in chunks if c.file.path.name == "a.jsonl.gz"]) == 1  # never cut


def test_a_bad_line_read_from_the_middle_of_a_file_is_named_by_its_byte(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(30)]
    lines[20] = "{not json"
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    offset = sum(len(line) + 1 for line in lines[:20])
    options = SMALL | {"piece_bytes": 100}
    with pytest.raises(DataError, match=rf"^{path}:byte {offset}: invalid JSON"):
        prepare([str(path)], "pydocs4k", 16, tmp_path / "parts", part=(1, 2), **options)
    with pytest.raises(DataError, match=rf"^{path}:21: invalid JSON"):  # read from byte 0: the line number
        prepare([str(path)], "pydocs4k", 16, tmp_path / "one", **options)
    for index in range(2):
        prepare([str(path)], "pydocs4k", 16, tmp_path / "parts", part=(index, 2), on_error="skip",
                overwrite=True, **options)
    (merged,) = merge(tmp_path / "parts").values()
    assert merged["skipped"] == {"bad_json": 1} and merged["documents"]["total"] == 29


def test_merged_parts_hold_the_documents_of_one_prepare(corpus, single, merged):
    one, joined = read_manifest(single), read_manifest(merged)
    assert joined["documents"] == one["documents"] and joined["tokenizer_id"] == one["tokenizer_id"]
    tok = load_tokenizer("pydocs4k")
    every_document = Counter(tuple(tok.encode(doc)) for doc in corpus[1])
    for split in ("train", "val"):
        for key in ("documents", "tokens", "stream_tokens"):
            if key != "tokens":  # tokens stored count each part's overlap token once more
                assert joined["splits"][split][key] == one["splits"][split][key], (split, key)
        assert split_documents(merged, split) == split_documents(single, split)
        every_document -= split_documents(merged, split)
    assert not every_document  # train + val: every source document once
    # Each merged shard is its part's shard: same checksum, path under the part directory.
    for index, part_dir in enumerate(joined["parts"]["dirs"]):
        part = read_manifest(merged / part_dir)
        assert part["part"]["index"] == index
        shards = [s for s in joined["splits"]["train"]["shards"] if s["path"].startswith(part_dir + "/")]
        assert [(s["sha256"], s["path"]) for s in shards] == \
            [(s["sha256"], f"{part_dir}/{s['path']}") for s in part["splits"]["train"]["shards"]]
    assert all(read_manifest(merged / d)["splits"]["train"]["documents"] > 0 for d in joined["parts"]["dirs"])


def test_without_shuffle_the_merged_split_is_in_source_order(corpus, tmp_path):
    kw = SMALL | {"piece_bytes": PIECE, "shuffle_seed": None}
    prepare([str(corpus[0])], "pydocs4k", 16, tmp_path / "one", **kw)
    for index in range(2):
        prepare([str(corpus[0])], "pydocs4k", 16, tmp_path / "parts", part=(index, 2), **kw)
    merge(tmp_path / "parts")
    tok = load_tokenizer("pydocs4k")
    in_order = [tuple(tok.encode(doc)) for doc in corpus[1]]
    train = list(split_documents(tmp_path / "parts", "train"))  # (a Counter keeps the order it saw them in)
    assert train == list(split_documents(tmp_path / "one", "train"))
    positions = [in_order.index(doc) for doc in train]
    assert positions == sorted(positions)
    assert len(train) == read_manifest(tmp_path / "one")["splits"]["train"]["documents"]


def test_loader_resumes_exactly_on_merged_data(merged):
    def loader():
        return build_dataloader(merged, "train", 3, 0, 1, 0, seed=5)
    n = read_manifest(merged)["splits"]["train"]["samples"]
    k = n // 3 - 2  # the resumed batches cross into epoch 1
    reference = batches(loader(), k + 6)
    assert sorted(i for e, i in sample_ids(reference) if e == 0) == list(range(n))  # every sample, keys checked
    first = loader()
    batches(first, k)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = batches(resumed, 6)
    assert {e for e, _ in sample_ids(after)} == {0, 1}
    for got, want in zip(after, reference[k:]):
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_parts_at_several_lengths_merge_per_length(corpus, tmp_path):
    kw = SMALL | {"piece_bytes": PIECE}
    prepare([str(corpus[0])], "pydocs4k", [16, 40], tmp_path / "one", **kw)
    for index in range(2):
        prepare([str(corpus[0])], "pydocs4k", [16, 40], tmp_path / "parts", part=(index, 2), **kw)
    assert sorted(p.name for p in (tmp_path / "parts" / "seq40").iterdir()) == ["part-00000-of-00002",
                                                                               "part-00001-of-00002"]
    done = merge(tmp_path / "parts")
    assert {d.name: m["seq_len"] for d, m in done.items()} == {"seq16": 16, "seq40": 40}
    for name in ("seq16", "seq40"):
        for split in ("train", "val"):
            assert split_documents(tmp_path / "parts" / name, split) == split_documents(tmp_path / "one" / name, split)


def test_merge_refuses_parts_that_do_not_belong_together(corpus, merged, tmp_path):
    source = str(corpus[0])
    parts = tmp_path / "parts"
    shutil.copytree(merged, parts)
    second = parts / "part-00001-of-00003"
    with pytest.raises(FileExistsError, match=f"{parts} already holds a prepared dataset"):
        prepare([source], "pydocs4k", 16, parts, part=(1, 3), piece_bytes=PIECE, **SMALL)
    # part 1 tokenised differently (--overwrite drops the stale merged manifest): named, with both values
    prepare([source], "gpt2", 16, parts, part=(1, 3), piece_bytes=PIECE, overwrite=True, **SMALL)
    with pytest.raises(ValueError, match=rf"{second}: tokenizer_id is 'gpt2-\w+' but "
                                         rf"{parts / 'part-00000-of-00003'} has 'pydocs4k-\w+'"):
        merge(parts)
    # another piece size: another plan (the validation count restarts elsewhere)
    prepare([source], "pydocs4k", 16, parts, part=(1, 3), piece_bytes=PIECE // 2, overwrite=True, **SMALL)
    with pytest.raises(ValueError, match=rf"{second}: piece_bytes is 1000 but .* has 2000"):
        merge(parts)
    shutil.rmtree(second)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 parts are missing or unfinished .*part-00001-of-00003"):
        merge(parts)
    shutil.copytree(merged / "part-00001-of-00003", second)
    (parts / "part-00000-of-00002").mkdir()
    with pytest.raises(ValueError, match="different splittings"):
        merge(parts)
    (parts / "part-00000-of-00002").rmdir()
    shard = second / read_manifest(second)["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(ValueError, match=rf"{shard}: \d+ bytes, its part's manifest says \d+ bytes"):
        merge(parts)
    with pytest.raises(FileNotFoundError, match="no part directories"):
        merge(tmp_path)


def test_cli_parts_merge_and_refusals(corpus, single, tmp_path, capsys):
    common = ["prepare", "--source", str(corpus[0]), "--tokenizer", "pydocs4k", "--seq-len", "16", "--workers", "1",
              "--no-progress", "--val-fraction", "0.2", "--piece-mb", str(PIECE / 1e6),
              "--entry-kb", str(4 * 17 * 4 / 1024),
              "--out", str(tmp_path / "out")]
    for index in range(2):
        assert main([*common, "--part", f"{index}/2"]) == 0
    assert f"{tmp_path / 'out' / 'part-00001-of-00002'}: tokenizer" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "out"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 parts:" in printed and "verify: OK" in printed
    for split in ("train", "val"):
        assert split_documents(tmp_path / "out", split) == split_documents(single, split)
    with pytest.raises(SystemExit):
        main([*common, "--part", "2/2"])
    assert "0 <= I < N" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--part 0/17: the sources make 16 pieces of --piece-mb 0.002.* most 16 parts"):
        prepare([str(corpus[0])], "pydocs4k", 16, tmp_path / "many", part=(0, 17), piece_bytes=PIECE, **SMALL)
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match="--part splits text sources only"):
        prepare([str(task)], "chars", 16, tmp_path / "task", format="task", part=(0, 1), **SMALL)
    with pytest.raises(SystemExit, match="merge: no part directories"):
        main(["merge", str(tmp_path / "task")])
