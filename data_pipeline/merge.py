"""Joining the part directories of `prepare --part I/N` into one prepared dataset, without copying.

    python -m data_pipeline merge data/web [--verify]

merge(root) reads root/part-0000I-of-0000N/manifest.json for every I (with several lengths,
root/seq{L}/part-...: one merged dataset per length), checks that the parts belong together and
writes root/manifest.json, which lists the shards of part 0, then part 1, ... (paths relative to
root). The loader reads root like any prepared directory, exact resume included.

Checks, each refusal naming the part directory and both values: all N parts are present and
finished (have a manifest) and no part of another N lies beside them; every part has the same
tokenizer id, tokenizer, vocabulary, sequence length, shard layout, packing, shuffle seed,
validation fraction, piece size, sources and piece plan; the parts' pieces follow each other
from the first to the last; every shard file exists with its recorded size (`--verify` also checks
every sha256 and entry, as `inspect --verify`). The merged manifest sums the counts (documents,
tokens, skipped, per split samples/tokens/documents) and keeps every shard's sha256. A part's tar
keys count its own entries, so each merged shard records the key of its first entry ("first_key").

Document order. Part I packs the documents of a split in a permutation seeded by (shuffle_seed,
split, I, N) (prepare.document_order): a merged split holds exactly the documents one prepare of
the same sources holds (same pieces, so same splits), each part's shuffled among themselves. The
loader draws shards in a seeded order per epoch and a micro-batch takes samples from distant places
of it (schedule.py), so documents of different parts meet at shard granularity, as documents of
different shards of one prepare do. With --no-shuffle the merged split is in source order. Stream
packing ends every part's split with its own EOT-padded sample (one prepare has one).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .manifest import MANIFEST_NAME, read_manifest, write_manifest
from .parts import PART_DIR, part_dirs

SAME_OPTIONS = ("tokenizer_id", "tokenizer", "vocab_size", "seq_len", "sample_len", "samples_per_entry",
                "token_dtype", "pack", "shuffle_seed", "val_fraction", "piece_bytes", "loss_mask", "sources")
SAME_PLAN = ("count", "piece_count", "piece_bytes", "plan")


def merge(root: str | os.PathLike) -> dict[Path, dict]:
    """Merge the parts under `root` (module docstring); {merged directory: its manifest}: root, or
    root/seq{L} for each length of parts prepared at several lengths."""
    root = Path(root)
    if part_dirs(root):
        return {root: merge_parts(root)}
    lengths = sorted((d for d in root.glob("seq*") if d.is_dir() and part_dirs(d)), key=lambda d: d.name)
    if not lengths:
        raise FileNotFoundError(f"no part directories in {root} (part-0000I-of-0000N/, or seq<L>/part-... with "
                                f"several --seq-len); write them with `python -m data_pipeline prepare ... "
                                f"--out {root} --part I/N` for I = 0 .. N-1")
    return {d: merge_parts(d) for d in lengths}


def merge_parts(root: Path) -> dict:
    """Merge root/part-*-of-N into root/manifest.json."""
    found = part_dirs(root)
    counts = sorted({d.name.rsplit("-", 1)[-1] for d in found})
    if len(counts) > 1:
        raise ValueError(f"{root} holds parts of different splittings (of {' and of '.join(counts)}: "
                         f"{found[0].name}, {found[-1].name}); remove the stale part directories")
    count = int(counts[0])
    dirs = [root / PART_DIR.format(index=i, count=count) for i in range(count)]
    missing = [d for d in dirs if not (d / MANIFEST_NAME).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {count} parts are missing or unfinished (no {MANIFEST_NAME}): "
                                f"{', '.join(str(d) for d in missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                                f"run `python -m data_pipeline prepare ... --part I/{count}` for each (same options "
                                f"as the others) and merge again")
    manifests = [read_manifest(d) for d in dirs]
    _check_parts(dirs, manifests)
    first = manifests[0]
    splits = {}
    for split in first["splits"]:
        shards, totals = [], Counter()
        for part_dir, manifest in zip(dirs, manifests):
            info = manifest["splits"][split]
            totals.update({key: info[key] for key in ("samples", "tokens", "documents", "stream_tokens")})
            first_key = 0
            for shard in info["shards"]:
                path = part_dir / shard["path"]
                size = path.stat().st_size if path.is_file() else None
                if size != shard["bytes"]:
                    raise ValueError(f"{path}: {'missing' if size is None else f'{size} bytes'}, its part's manifest "
                                     f"says {shard['bytes']} bytes; prepare {part_dir.name} again")
                shards.append({**shard, "path": f"{part_dir.name}/{shard['path']}", "first_key": first_key})
                first_key += shard["entries"]
        if totals["documents"] == 0:
            raise ValueError(f"no documents of split {split!r} in the {count} parts under {root} (skipped: "
                             f"{dict(sum((Counter(m['skipped']) for m in manifests), Counter()))})")
        splits[split] = dict(totals) | {"shards": shards}
    documents = sum((Counter(m["documents"]) for m in manifests), Counter())
    skipped = sum((Counter(m["skipped"]) for m in manifests), Counter())
    plan = first["part"]
    merged = {key: value for key, value in first.items() if key not in ("part", "splits", "documents", "skipped")}
    merged |= {"documents": {key: documents[key] for key in first["documents"]},
               "skipped": dict(sorted(skipped.items())), "splits": splits, "parts": {key: plan[key] for key in SAME_PLAN} | {"dirs": [d.name for d in dirs]}}
    write_manifest(root, merged)
    return merged


def _check_parts(dirs: list[Path], manifests: list[dict]) -> None:
    first_dir, first = dirs[0], manifests[0]
    end = 0  # the piece the next part must start at
    for index, (part_dir, manifest) in enumerate(zip(dirs, manifests)):
        if "part" not in manifest:
            raise ValueError(f"{part_dir}: its manifest has no \"part\" section; it was not written by "
                             f"prepare --part {index}/{len(dirs)}")
        part = manifest["part"]
        differing = [(key, manifest.get(key), first.get(key)) for key in SAME_OPTIONS
                     if manifest.get(key) != first.get(key)]
        differing += [(f"part.{key}", part[key], first["part"][key]) for key in SAME_PLAN
                      if part[key] != first["part"][key]]
        if differing:
            key, value, expected = differing[0]
            hint = (" (the source files changed between the parts)" if key == "part.plan" else
                    "" if len(differing) == 1 else f" (and {', '.join(k for k, _, _ in differing[1:])})")
            raise ValueError(f"{part_dir}: {key} is {value!r} but {first_dir} has {expected!r}{hint}; every part "
                             f"must be prepared from the same sources with the same options: prepare "
                             f"{part_dir.name} again")
        if part["index"] != index or part["pieces"][0] != end:
            raise ValueError(f"{part_dir}: its manifest says part {part['index']} with pieces {part['pieces']}, "
                             f"expected part {index} starting at piece {end}; prepare {part_dir.name} again")
        end = part["pieces"][1]
    if end != first["part"]["piece_count"]:
        raise ValueError(f"{dirs[-1]}: the parts end at piece {end} of {first['part']['piece_count']}; "
                         f"prepare {dirs[-1].name} again")
