"""Data pipeline throughput: tokenisation MB/s (1 and all cores) and loader tokens/s per process.

    python benchmarks/data_pipeline.py                       # cl100k_base, seq-len 8192
    python benchmarks/data_pipeline.py --tokenizer o200k_base --seq-len 8192 --seconds 10

Tokenisation runs over the built-in corpus (Python docs, 11 MB of text) repeated --repeat times
and written as plain JSONL, so start-up costs weigh as little as on a real corpus:
  raw       tiktoken's encode_ordinary_batch on the texts already in memory (threads = cores)
  prepare   the whole `prepare` (read + JSON, tokenise in worker processes, pack, write shards,
            sha256), MB of document text per wall-clock second
"MB per CPU-second" counts all processes' CPU time, so it shows overhead even on a busy machine.
Targets (issue 4): prepare within 20% of raw; the loader >= 10 M tokens/s per process at seq-len
8192. Loader tokens/s count the micro_batch_size * seq_len training tokens the trainer receives,
from local disk (page cache warm: the corpus is small), with sha256 verification on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# no torch import at the top: spawned tokeniser workers re-import this script
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.readers import iter_documents  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def bench_raw(texts: list[str], tokenizer: str, threads: int) -> dict:
    encoding = load_tokenizer(tokenizer).encoding
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=threads)))
    return {"seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu, "tokens": tokens}


def bench_prepare(source: Path, tokenizer: str, seq_len: int, out: Path, workers: int) -> dict:
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare(str(source), tokenizer, seq_len, out, num_workers=workers, progress=False, overwrite=True)
    return {"seconds": time.perf_counter() - start, "cpu": cpu_seconds() - cpu,
            "tokens": manifest["documents"]["tokens"]}


def bench_loader(data: Path, workers: int, micro_batch_size: int, seconds: float) -> dict:
    from data_pipeline.loader import build_dataloader
    loader = build_dataloader(data, "train", micro_batch_size, 0, 1, workers, seed=0)
    iterator = iter(loader)
    for _ in range(3 if workers == 0 else 3 * workers):  # warm-up: worker start, first shard hash
        next(iterator)
    tokens, batches, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(iterator)
        tokens += batch["tokens"][:, :-1].numel()
        batches += 1
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="cl100k_base", help="tokenizer spec (see load_tokenizer)")
    parser.add_argument("--seq-len", type=int, default=8192, help="sequence length for the loader")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="loader micro-batch size")
    parser.add_argument("--seconds", type=float, default=5.0, help="loader measuring time per setting")
    parser.add_argument("--repeat", type=int, default=3, help="copies of the corpus to tokenise")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    texts = [d.text for d in iter_documents("builtin")] * args.repeat
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    load_tokenizer(args.tokenizer)  # both sides start with the tokenizer loaded
    import webdataset  # noqa: F401  (prepare imports it, and torch with it, on first write)
    results = {"cores": cores, "tokenizer": args.tokenizer, "seq_len": args.seq_len, "text_mb": mb, "rows": []}
    print(f"# data pipeline benchmark: {args.tokenizer}, built-in corpus x{args.repeat} = {mb:.1f} MB text, "
          f"{cores} cores (load average before: {os.getloadavg()[0]:.1f}), seq-len {args.seq_len}\n")
    print("| what | processes/threads | MB/s | M tokens/s | vs raw | MB per CPU-second |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data, source = Path(tmp) / "data", Path(tmp) / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        for n in sorted({1, cores}):
            raw = bench_raw(texts, args.tokenizer, n)
            ours = bench_prepare(source, args.tokenizer, args.seq_len, data, n)
            for name, r in (("raw encode_ordinary_batch", raw), ("prepare (end to end)", ours)):
                ratio = (r["tokens"] / r["seconds"]) / (raw["tokens"] / raw["seconds"])
                print(f"| {name} | {n} | {mb / r['seconds']:.2f} | {r['tokens'] / r['seconds'] / 1e6:.2f} "
                      f"| {ratio:.0%} | {mb / r['cpu']:.2f} |")
                results["rows"].append({"what": name, "n": n, "mb_s": mb / r["seconds"],
                                        "tokens_s": r["tokens"] / r["seconds"], "mb_per_cpu_s": mb / r["cpu"]})
        print(f"\n| loader (seq-len {args.seq_len}, micro-batch {args.micro_batch_size}) | DataLoader workers "
              f"| M tokens/s per process | batches/s |")
        print("|---|---|---|---|")
        for workers in sorted({0, cores}):
            r = bench_loader(data, workers, args.micro_batch_size, args.seconds)
            print(f"| train split | {workers} | {r['tokens'] / r['seconds'] / 1e6:.1f} "
                  f"| {r['batches'] / r['seconds']:.0f} |")
            results["rows"].append({"what": "loader", "workers": workers, "tokens_s": r["tokens"] / r["seconds"]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
