"""Bad input, in the corpus and in the shards: a clear error naming file and line/entry, or a counted
skip with on_error="skip"; never a silently wrong batch."""

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import build_dataloader
from data_pipeline.manifest import read_manifest, write_manifest
from data_pipeline.prepare import prepare
from dp_helpers import prepare_small, rewrite_member, sample_ids

GOOD = json.dumps({"text": "a good document"}).encode() + b"\n"
BAD_LINES = {  # reason -> a JSONL line
    "invalid_utf8": b'{"text": "caf\xe9 latin-1"}\n',
    "empty_document": b'{"text": "  \\n "}\n',
    "bad_json": b'{"text": "unterminated\n',
    "missing_field": b'{"body": "wrong field"}\n',
    "bad_field": b'{"text": 42}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES) + ["lone_surrogate"])
def test_bad_jsonl_line_is_named_or_counted(tmp_path, reason):
    bad = b'{"text": "half a pair \\ud800"}\n' if reason == "lone_surrogate" else BAD_LINES[reason]
    source = tmp_path / "c.jsonl"
    source.write_bytes(GOOD * 3 + bad + GOOD)
    with pytest.raises(DataError) as error:
        prepare(str(source), "pydocs4k", 8, tmp_path / "out", num_workers=1, progress=False)
    assert f"c.jsonl:4: " in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = prepare(str(source), "pydocs4k", 8, tmp_path / "out", num_workers=1, progress=False,
                       on_error="skip", overwrite=True)
    expected = "invalid_utf8" if reason == "lone_surrogate" else reason
    assert manifest["skipped"] == {expected: 1} and manifest["documents"]["total"] == 4


def test_bad_text_file_and_parquet(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("fine")
    (tmp_path / "docs" / "b.txt").write_bytes(b"\xff\xfe broken")
    (tmp_path / "docs" / "c.txt").write_text("")
    with pytest.raises(DataError, match=r"b\.txt: not valid UTF-8 \(byte 0xff at offset 0\)"):
        prepare(str(tmp_path / "docs"), "pydocs4k", 8, tmp_path / "o1", num_workers=1, progress=False)
    manifest = prepare(str(tmp_path / "docs"), "pydocs4k", 8, tmp_path / "o1", num_workers=1, progress=False,
                       on_error="skip", overwrite=True)
    assert manifest["skipped"] == {"invalid_utf8": 1, "empty_document": 1}

    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet:row 1: 'text' is null"):
        prepare(str(tmp_path / "t.parquet"), "pydocs4k", 8, tmp_path / "o2", num_workers=1, progress=False)
    with pytest.raises(DataError, match="no column 'body'"):
        prepare(str(tmp_path / "t.parquet"), "pydocs4k", 8, tmp_path / "o3", num_workers=1, progress=False,
                text_field="body")


@pytest.fixture
def data(tmp_path):
    out, _ = prepare_small(tmp_path, n_docs=40, val_fraction=0.25)
    return out


def first_train_shard(data):
    return data / read_manifest(data)["splits"]["train"]["shards"][0]["path"]


def read_all(data, **kw):
    loader = build_dataloader(data, "train", 2, 0, 1, 0, seed=3, infinite=False, **kw)
    return loader, list(loader)


def refresh_checksum(data, shard):
    """Make the manifest agree with a rewritten shard, so only the deeper checks can catch it."""
    manifest = read_manifest(data)
    for entry in manifest["splits"]["train"]["shards"]:
        if data / entry["path"] == shard:
            entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    write_manifest(data, manifest)


def check_error_then_skip(data, reason, match, **kw):
    with pytest.raises(DataError, match=match):
        read_all(data, **kw)
    loader, got = read_all(data, on_error="skip", **kw)
    N = read_manifest(data)["splits"]["train"]["samples"]
    lost = loader.skipped[reason]
    assert lost > 0 and set(loader.skipped) == {reason}
    assert len(sample_ids(got)) == N - lost  # the rest is delivered, nothing twice
    assert len(set(sample_ids(got))) == N - lost
    return lost


def test_missing_shard(data):
    first_train_shard(data).unlink()
    lost = check_error_then_skip(data, "unreadable_shard", r"shard-000000\.tar: shard file is missing")
    assert lost == read_manifest(data)["splits"]["train"]["shards"][0]["samples"]


def test_unreadable_shard(data):
    shard = first_train_shard(data)
    shard.write_bytes(b"\0" * 100 + b"not a tar" * 100)
    refresh_checksum(data, shard)
    check_error_then_skip(data, "unreadable_shard", r"shard-000000\.tar.*cannot read shard")


def test_truncated_shard(data):
    shard = first_train_shard(data)
    shard.write_bytes(shard.read_bytes()[:3000])
    check_error_then_skip(data, "truncated_shard", r"shard-000000\.tar: shard has 3000 bytes, manifest says")
    refresh_checksum(data, shard)  # manifest agrees (e.g. rewritten by hand): the tar itself is short
    check_error_then_skip(data, "unreadable_shard", r"shard-000000\.tar entry \d.*cannot read shard")


def test_checksum_mismatch(data):
    shard = first_train_shard(data)
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0x01  # inside the first entry's data: same size, different bytes
    shard.write_bytes(bytes(raw))
    check_error_then_skip(data, "checksum_mismatch", r"shard-000000\.tar: sha256 [0-9a-f]+ does not match")


def test_token_id_beyond_vocab(data):
    shard = first_train_shard(data)

    def poison(raw):
        tokens = np.frombuffer(raw, dtype="<u4").copy()
        tokens[5] = 4096
        return tokens.tobytes()

    rewrite_member(shard, "tokens.u32", 1, poison)
    refresh_checksum(data, shard)
    check_error_then_skip(data, "bad_entry", r"shard-000000\.tar entry 1 \(key 000000001\): token id 4096 >= "
                                             r"vocab size 4096")


def test_malformed_boundaries_and_swapped_shards(data):
    shard = first_train_shard(data)
    rewrite_member(shard, "docs.u32", 0, lambda raw: raw[:-4])
    refresh_checksum(data, shard)
    check_error_then_skip(data, "bad_entry", r"entry 0 .*docs\.u32")
    shard.unlink()
    second = data / read_manifest(data)["splits"]["train"]["shards"][1]["path"]
    shutil.copy(second, shard)
    refresh_checksum(data, shard)
    check_error_then_skip(data, "bad_entry", r"expected key 000000000 \(entries out of order, or shards swapped\)")


def test_streamed_shards_match_local_and_detect_truncation(data):
    local = sample_ids(read_all(data)[1])
    template = "pipe:cat " + str(data) + "/{path}"
    loader, streamed = read_all(data, shard_url_template=template)
    assert sample_ids(streamed) == local
    reference = read_all(data)[1]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(streamed, reference))
    shard = first_train_shard(data)
    shard.write_bytes(shard.read_bytes()[:3000])
    refresh_checksum(data, shard)
    with pytest.raises(DataError, match=r"cat .*shard-000000\.tar"):
        read_all(data, shard_url_template=template)


def test_without_checksums_the_token_check_still_guards(data):
    shard = first_train_shard(data)
    raw = bytearray(shard.read_bytes())
    # first entry: docs member header + data (1024 bytes), then the tokens member's header (512)
    assert raw[1024:1024 + 22] == b"000000000.tokens.u32\0\0"
    raw[1536 + 4 * 5 + 3] = 0x01  # high byte of token 5 of the first sample
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum|sha256"):
        read_all(data)
    with pytest.raises(DataError, match=r"token id \d+ >= vocab size 4096 \(sample 0 of the entry, position 5\)"):
        read_all(data, verify_checksums=False)
