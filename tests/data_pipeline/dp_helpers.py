"""Shared helpers for the data_pipeline tests: a small synthetic corpus, prepared with the real
tokenizer/webdataset, plus readers that look at the shards without going through the loader."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.manifest import read_manifest
from data_pipeline.packing import decode_entry
from data_pipeline.prepare import DEFAULT_SHUFFLE_SEED, document_order, prepare
from data_pipeline.tokenizer import load_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega the of and module function returns value list").split()


def make_documents(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        docs.append(f"Document {i}. " + " ".join(words) + ("." if i % 3 else "\n\nÜnïcödé ✓ 数据"))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def prepare_small(tmp: Path, n_docs: int = 60, seq_len: int = 16, samples_per_entry: int = 4,
                  entries_per_shard: int = 3, name: str = "data", **kw) -> tuple[Path, list[str]]:
    """Prepare a synthetic corpus into several shards (the last ones partial)."""
    docs = make_documents(n_docs)
    source = write_jsonl(tmp / f"{name}.jsonl", docs)
    out = tmp / name
    sample_bytes = (seq_len + 1) * 4
    kw = {"val_fraction": 0.2, "num_workers": 1, "progress": False} | kw
    prepare([str(source)], "pydocs4k", seq_len, out, entry_bytes=samples_per_entry * sample_bytes,
            shard_bytes=entries_per_shard * samples_per_entry * sample_bytes, **kw)
    return out, docs


def expected_streams(docs: list[str], val_fraction: float = 0.2,
                     shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED) -> dict[str, list[int]]:
    """The token stream prepare should pack per split: doc EOT doc EOT ..., in the seeded order."""
    tok = load_tokenizer("pydocs4k")
    every = round(1 / val_fraction)
    per_split = {"train": [], "val": []}
    for i, doc in enumerate(docs):
        per_split["val" if i % every == every - 1 else "train"].append(doc)
    streams = {}
    for split, split_docs in per_split.items():
        order = document_order(len(split_docs), shuffle_seed, split)
        streams[split] = [t for i in order for t in tok.encode(split_docs[i]) + [tok.eot_id]]
    return streams


def read_split(data_dir: Path, split: str) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """All samples of a split in storage order, straight from the tar files."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard["path"]) as tar:
            members = [m for m in tar.getmembers() if not m.name.endswith(".mask.bits")]
            for docs_m, tokens_m in zip(members[0::2], members[1::2]):
                tokens, bounds = decode_entry(tar.extractfile(tokens_m).read(), tar.extractfile(docs_m).read(),
                                              manifest["sample_len"], manifest["vocab_size"])
                samples += [(tokens[i], *bounds[i]) for i in range(len(tokens))]
    return samples


def rewrite_member(shard: Path, member_suffix: str, entry: int, transform) -> None:
    """Rewrite one member of one entry of a shard (keeping valid tar structure)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for i, (member, data) in enumerate(members):
            if i // 2 == entry and member.name.endswith(member_suffix):
                data = transform(data)
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def batches(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def sample_ids(batch_list: list[dict]) -> list[tuple[int, int]]:
    return [(int(e), int(i)) for b in batch_list for e, i in zip(b["epoch"], b["sample_index"])]


def split_documents(data_dir: Path, split: str) -> Counter:
    """The documents (token tuples without their EOT) stored in a split of a stream-packed directory,
    as a multiset: each part's samples rebuilt into its token stream, cut after every EOT."""
    manifest = read_manifest(data_dir)
    eot, sample_len = manifest["tokenizer"]["eot_id"], manifest["sample_len"]
    streams: dict[str, list[int]] = {}
    for shard in manifest["splits"][split]["shards"]:
        part = shard["path"].split("/")[0] if shard["path"].startswith("part-") else ""
        with tarfile.open(data_dir / shard["path"]) as tar:
            members = tar.getmembers()
            for docs_m, tokens_m in zip(members[0::2], members[1::2]):
                tokens, bounds = decode_entry(tar.extractfile(tokens_m).read(), tar.extractfile(docs_m).read(),
                                              sample_len, manifest["vocab_size"])
                for row, (n_valid, _) in zip(tokens, bounds):
                    stream = streams.setdefault(part, [])
                    stream += row[1 if stream else 0:n_valid].tolist()  # samples overlap by one token
    documents = Counter()
    for stream in streams.values():
        assert stream[-1] == eot
        start = 0
        for at, token in enumerate(stream):
            if token == eot:
                documents[tuple(stream[start:at])] += 1
                start = at + 1
    return documents
