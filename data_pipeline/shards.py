"""Reading entries out of the tar shards, with every check that stands between a bad file and a
wrong batch: size, sha256, member names/keys, entry count, token ids < vocab size, boundaries.

Local shards are opened with seeking (jumping to an entry costs a few header reads). Anything else
webdataset can open (`pipe:aws s3 cp s3://... -`, `http://...`) is read as a forward-only stream:
going back reopens it, going forward reads and discards.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .packing import DOCS_MEMBER, MASK_MEMBER, TOKENS_MEMBER, decode_entry, decode_mask


@dataclass(frozen=True)
class ShardSpec:
    url: str  # local path or webdataset URL
    first_entry: int  # the tar key of the shard's first entry: its entry number in the split (in its part
    # for a dataset merged from parts: the manifest's "first_key")
    entries: int
    samples: int
    bytes: int
    sha256: str

    @property
    def local(self) -> bool:
        return "://" not in self.url and not self.url.startswith("pipe:")


@dataclass(frozen=True)
class Entry:
    tokens: np.ndarray  # (k, L + 1) uint32
    bounds: list[tuple[int, np.ndarray]]  # (n_valid, starts) per sample
    mask: np.ndarray | None  # (k, L + 1) bool loss mask; None when the data has none (all targets)


def shard_specs(manifest: dict, split: str, data_dir: str, url_template: str | None) -> list[ShardSpec]:
    """Shards of a split in storage order; `url_template` ("pipe:... {path} ...") maps manifest paths
    to remote URLs, default: files under data_dir."""
    specs, first_entry = [], 0
    for shard in manifest["splits"][split]["shards"]:
        url = url_template.format(path=shard["path"]) if url_template else os.path.join(data_dir, shard["path"])
        specs.append(ShardSpec(url, shard.get("first_key", first_entry), shard["entries"], shard["samples"],
                               shard["bytes"], shard["sha256"]))
        first_entry += shard["entries"]
    return specs


class ShardReader:
    """Reads entries of one shard at a time; one per stream (lane), so streams never share a cursor."""

    def __init__(self, sample_len: int, samples_per_entry: int, vocab_size: int, verify_checksums: bool,
                 verified: set[str], failed: dict[str, DataError], with_mask: bool = False):
        self.sample_len, self.samples_per_entry, self.vocab_size = sample_len, samples_per_entry, vocab_size
        self.members = (DOCS_MEMBER, MASK_MEMBER, TOKENS_MEMBER) if with_mask else (DOCS_MEMBER, TOKENS_MEMBER)
        self.verify_checksums = verify_checksums
        self.verified = verified  # shared by a worker's readers: hash each shard once per process
        self.failed = failed  # shard-level errors, shared too: a bad shard is not re-opened per entry
        self._spec: ShardSpec | None = None
        self._tar: tarfile.TarFile | None = None
        self._index: dict[int, tuple[tarfile.TarInfo, ...]] = {}  # seekable shards
        self._next_entry = 0  # forward-only shards: entry the stream is positioned at
        self._cache: tuple[int, Entry] | None = None

    def close(self) -> None:
        if self._tar is not None:
            fileobj = self._tar.fileobj
            self._tar.close()
            fileobj.close()  # tarfile leaves a fileobj we passed in open
        self._tar, self._spec, self._index, self._cache = None, None, {}, None

    def read(self, spec: ShardSpec, entry: int) -> Entry:
        if self._cache is not None and self._spec == spec and self._cache[0] == entry:
            return self._cache[1]
        where = f"{spec.url} entry {entry} (key {spec.first_entry + entry:09d})"
        if spec.url in self.failed:
            raise self.failed[spec.url]
        try:
            if self._spec != spec:
                self._open(spec)
            data = self._read_members(spec, entry)
        except (tarfile.TarError, OSError, EOFError) as e:
            self._fail(spec, DataError("unreadable_shard", where, f"cannot read shard: {type(e).__name__}: {e}"))
        except DataError as e:
            self._fail(spec, e)
        try:
            tokens, bounds = decode_entry(data[TOKENS_MEMBER], data[DOCS_MEMBER], self.sample_len,
                                          self.vocab_size)
            mask = decode_mask(data[MASK_MEMBER], len(tokens), self.sample_len) \
                if MASK_MEMBER in data else None
        except ValueError as e:
            raise DataError("bad_entry", where, str(e)) from None
        expected = min(self.samples_per_entry, spec.samples - entry * self.samples_per_entry)
        if len(tokens) != expected:
            raise DataError("bad_entry", where, f"{len(tokens)} samples, manifest implies {expected}")
        result = Entry(tokens, bounds, mask)
        self._cache = (entry, result)
        return result

    def _fail(self, spec: ShardSpec, error: DataError):
        # Errors opening or walking the tar (not a bad entry's content) condemn the whole shard:
        # later entries fail fast instead of re-hashing or re-streaming it each time.
        self.close()
        self.failed[spec.url] = error
        raise error from None

    # -- opening and checking ------------------------------------------------------------------

    def _open(self, spec: ShardSpec) -> None:
        self.close()
        if spec.local:
            if not os.path.isfile(spec.url):
                raise DataError("unreadable_shard", spec.url, "shard file is missing")
            size = os.path.getsize(spec.url)
            if size != spec.bytes:
                raise DataError("truncated_shard", spec.url,
                                f"shard has {size} bytes, manifest says {spec.bytes} (truncated or replaced)")
        if self.verify_checksums and spec.url not in self.verified:
            digest = _sha256(spec)
            if digest != spec.sha256:
                raise DataError("checksum_mismatch", spec.url,
                                f"sha256 {digest} does not match the manifest's {spec.sha256}")
            self.verified.add(spec.url)
        self._spec = spec
        if spec.local:
            self._tar = tarfile.open(spec.url, mode="r:")
            self._index = self._build_index(spec)
        else:
            self._open_stream(spec)

    def _build_index(self, spec: ShardSpec) -> dict[int, tuple[tarfile.TarInfo, ...]]:
        members = self._tar.getmembers()  # header reads only: tarfile seeks over the data
        m = len(self.members)
        if len(members) != m * spec.entries:
            raise DataError("truncated_shard", spec.url,
                            f"{len(members)} tar members, manifest implies {m * spec.entries}")
        index = {}
        for i in range(spec.entries):
            infos = tuple(members[m * i:m * i + m])  # ShardWriter writes members sorted
            self._check_names(spec, i, [info.name for info in infos])
            index[i] = infos
        return index

    def _check_names(self, spec: ShardSpec, entry: int, names: list[str]) -> None:
        key = f"{spec.first_entry + entry:09d}"
        if names != [f"{key}.{member}" for member in self.members]:
            raise DataError("bad_entry", f"{spec.url} entry {entry}",
                            f"members {names}; expected key {key} (entries out of order, or shards "
                            f"swapped) and members {list(self.members)}")

    def _open_stream(self, spec: ShardSpec) -> None:
        import webdataset
        self._tar = tarfile.open(fileobj=webdataset.gopen(spec.url, "rb"), mode="r|")
        self._next_entry = 0

    def _read_members(self, spec: ShardSpec, entry: int) -> dict[str, bytes]:
        """{member suffix: bytes} of one entry."""
        if not 0 <= entry < spec.entries:
            raise DataError("bad_entry", spec.url, f"entry {entry} out of range (shard has {spec.entries})")
        if spec.local:
            return {name: self._tar.extractfile(info).read()
                    for name, info in zip(self.members, self._index[entry])}
        if entry < self._next_entry:
            self._open_stream(spec)  # forward-only: start over
        while True:
            # A stream member's data can only be read before the next header is read.
            wanted = self._next_entry == entry
            infos, data = [], {}
            for name in self.members:
                info = self._tar.next()
                if info is None:
                    raise DataError("truncated_shard", spec.url,
                                    f"stream ended after {self._next_entry} of {spec.entries} entries")
                infos.append(info.name)
                if wanted:
                    data[name] = self._tar.extractfile(info).read()
            self._check_names(spec, self._next_entry, infos)
            self._next_entry += 1
            if wanted:
                return data


def _sha256(spec: ShardSpec) -> str:
    import webdataset
    h = hashlib.sha256()
    try:
        with (open(spec.url, "rb") if spec.local else webdataset.gopen(spec.url, "rb")) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise DataError("unreadable_shard", spec.url, f"cannot read shard: {e}") from None
    return h.hexdigest()
