"""Rebuild the built-in corpus python311_docs.jsonl.xz from Debian's python3.11-doc package.

    python -m data_pipeline.corpus.build_python_docs            # apt-get download + dpkg-deb -x
    python -m data_pipeline.corpus.build_python_docs --deb python3.11-doc_3.11.2-6+deb12u8_all.deb

One JSON line per documentation page: {"id": "library/os.rst", "text": <reStructuredText source>},
sorted by id. Only needed to refresh the committed file; prepare never downloads anything.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import lzma
import os
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "python311_docs.jsonl.xz"
SOURCES = "usr/share/doc/python3.11/html/_sources"


def build(deb: str | None, out: Path = OUT) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        if deb is None:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True)
            deb = glob.glob(os.path.join(tmp, "python3.11-doc_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        root = Path(tmp, "x", SOURCES)
        lines = []
        for path in sorted(root.rglob("*.rst.txt")):
            page = str(path.relative_to(root)).removesuffix(".txt")
            text = path.read_text(encoding="utf-8")
            if text.strip():
                lines.append(json.dumps({"id": page, "text": text}, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    out.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", help="an already downloaded python3.11-doc .deb (default: apt-get download)")
    args = parser.parse_args()
    print(f"wrote {OUT}; sha256 of the uncompressed JSONL: {build(args.deb)}")
