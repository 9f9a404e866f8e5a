"""Session-wide test setup, loaded before any test module.

Triton's CPU interpreter must be chosen before triton is first imported anywhere in the process:
test modules that import transformers or torch's compiler stack pull triton in early, and kernels
built by an interpreter-less triton cannot run in the interpreter later. The Hopper compile checks
run in a subprocess without this variable (tests/kernels/test_feedback_triton_sm90.py).

Set-up that several test folders need is made once per test run here.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402 (after the environment above)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """The built-in corpus, tokenised with the bundled pydocs4k BPE into 64-token sequences (read-only:
    a test that changes or hides the data works on a copy)."""
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "pydocs64"
    prepare("builtin", "pydocs4k", 64, out, num_workers=1, progress=False)
    return out
