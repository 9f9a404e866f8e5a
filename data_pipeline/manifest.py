"""The JSON manifest next to the shards: what `prepare` wrote and what the loader trusts.

    {
      "format": "sessa.data_pipeline.shards/1",
      "tokenizer_id": "pydocs4k-5cd72dae532c", "tokenizer": {"name", "spec", "vocab_size", "eot_id"},
      "vocab_size": 4096, "seq_len": 1024, "sample_len": 1025, "samples_per_entry": 127,
      "token_dtype": "uint32le", "pack": "stream" | "greedy" | "none", "shuffle_seed": 0 | null,
      "loss_mask": false,           # true: every tar entry has a mask member (packing.py)
      "task": {...},                # only for task data: fields, separator, loss_on, labels
      "sources": [...], "documents": {...}, "skipped": {reason: count},
      "piece_bytes": 256000000,     # text: the pieces the sources were cut into (parts.py)
      "splits": {"train": {"samples", "tokens", "documents", "stream_tokens",
                           "shards": [{"path", "entries", "samples", "tokens", "bytes", "sha256"}]},
                 "val": {...}, "test": {...} (task data)},
      "part": {"index", "count", "pieces", "piece_count", "piece_bytes", "plan"},  # prepare --part only
      "parts": {"count", "piece_count", "piece_bytes", "plan", "dirs"}  # merged (merge.py): each shard
                                    # also has "first_key", the tar key of its first entry in its part
    }

Manifests written before "pack", "shuffle_seed" and "loss_mask" existed read as stream packing
without masks. Shard paths are relative to the data directory. Per shard, "samples" counts packed sequences and
"tokens" counts real (non-padding) tokens stored, including the one-token overlap between samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "sessa.data_pipeline.shards/1"
PREPARE_HINT = ("python -m data_pipeline prepare --source builtin --tokenizer pydocs4k "
                "--seq-len 1024 --out {dir}")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load DIR/manifest.json; a missing directory or manifest says how to create it."""
    data_dir = Path(data_dir)
    hint = PREPARE_HINT.format(dir=data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; prepare it first, e.g.\n  {hint}")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared data directory "
                                f"(or preparation did not finish); run\n  {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `python -m data_pipeline prepare`") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically, last: a directory without a manifest is an unfinished one."""
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def check_tokenizer(manifest: dict, expected_tokenizer_id: str | None, where: str) -> None:
    """Refuse data tokenised differently from what the model expects."""
    if expected_tokenizer_id is not None and manifest["tokenizer_id"] != expected_tokenizer_id:
        raise ValueError(f"tokenizer mismatch: data in {where} was tokenised with "
                         f"{manifest['tokenizer_id']!r} but the model expects {expected_tokenizer_id!r}; "
                         f"re-run prepare with the model's tokenizer or load the matching checkpoint")


def split_info(manifest: dict, split: str, where: str) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{where} has no split {split!r} (splits: {sorted(splits)})")
    if splits[split]["samples"] == 0:
        raise ValueError(f"split {split!r} of {where} has no samples (corpus too small for "
                         f"seq_len={manifest['seq_len']}, or val_fraction=0)")
    return splits[split]


def fingerprint(manifest: dict, split: str) -> str:
    """Identifies a split's exact contents; loader states refuse to resume on other data."""
    info = manifest["splits"][split]
    key = json.dumps([manifest["tokenizer_id"], manifest["seq_len"], manifest["samples_per_entry"],
                      [(s["path"], s["samples"], s["sha256"]) for s in info["shards"]]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]
