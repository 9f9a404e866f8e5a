"""A small prepared dataset for the end-to-end sweep (the same as tests/pretrain's)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """The built-in corpus, tokenised with the bundled pydocs4k BPE into 64-token sequences."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "pydocs64"
    prepare("builtin", "pydocs4k", 64, out, num_workers=1, progress=False)
    return out
