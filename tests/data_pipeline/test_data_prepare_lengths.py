"""prepare at several sequence lengths: one tokenisation pass, and each length's directory exactly
what a prepare at that length alone writes (manifest and every shard, byte for byte)."""
import logging

import pytest

from data_pipeline.__main__ import main
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from dp_helpers import make_documents, write_jsonl

SMALL = dict(val_fraction=0.2, num_workers=1, progress=False, entry_bytes=4 * 65 * 4, shard_bytes=3 * 4 * 65 * 4)


def files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("pack", ["stream", "greedy"])
def test_each_length_is_what_a_single_length_prepare_writes(tmp_path, pack):
    # up to 40 words: with whole documents (greedy), 64 tokens hold about half of them, 128 all
    source = str(write_jsonl(tmp_path / "docs.jsonl", make_documents(50, max_words=40)))
    options = SMALL | {"pack": pack, "on_error": "skip"}
    alone = {seq_len: prepare([source], "pydocs4k", seq_len, tmp_path / f"alone{seq_len}", **options)
             for seq_len in (64, 128)}
    together = prepare([source], "pydocs4k", [64, 128], tmp_path / "together", **options)

    assert sorted(p.name for p in (tmp_path / "together").iterdir()) == ["seq128", "seq64"]
    for seq_len in (64, 128):
        assert together[seq_len] == alone[seq_len]
        assert files(tmp_path / "together" / f"seq{seq_len}") == files(tmp_path / f"alone{seq_len}")
    if pack == "greedy":  # whole documents: the short length skips some, so splits are decided per length
        assert alone[64]["skipped"]["too_long"] > 0 and alone[128]["skipped"] == {}
        assert alone[64]["splits"]["val"]["documents"] > 0


def test_the_tokenizer_runs_once_for_all_lengths(tmp_path, caplog):
    source = str(write_jsonl(tmp_path / "docs.jsonl", make_documents(30)))
    with caplog.at_level(logging.INFO, logger="data_pipeline.prepare"):
        prepare([source], "pydocs4k", [16, 32, 64], tmp_path / "out", **SMALL)
    passes = [r.getMessage() for r in caplog.records if "tokenised" in r.getMessage()]
    assert len(passes) == 1 and passes[0].startswith("tokenised 30 documents") and passes[0].endswith("16, 32, 64")


def test_cli_writes_one_directory_per_length(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", make_documents(20))
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(source), "--tokenizer", "pydocs4k", "--seq-len", "16,48",
                 "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert [read_manifest(out / name)["seq_len"] for name in ("seq16", "seq48")] == [16, 48]
    assert f"{out / 'seq48'}: tokenizer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", "--source", str(source), "--tokenizer", "pydocs4k", "--seq-len", "16,x", "--out", str(out)])
    with pytest.raises(ValueError, match="distinct"):
        prepare([str(source)], "pydocs4k", [16, 16], tmp_path / "twice", **SMALL)
