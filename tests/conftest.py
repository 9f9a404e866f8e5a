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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, prepared_data) -> dict:
    """{"tmp", "data", "recipe", "run", "hf"}: tests/pretrain's tiny recipe trained 3 steps on a private copy
    of the session dataset (a test may hide it), and the run's HF export, verified by the exporter. The
    reference init (uniform +-1/sqrt(fan_in)) gives attention far from uniform, so heads differ. Tests
    read these; a test that writes puts its files under `tmp` with a name of its own."""
    import json
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.pretrain.conftest import REPO, TEST_RECIPE, pretrain_env, run_pretrain

    tmp = tmp_path_factory.mktemp("tiny-run")
    data = tmp / "pydocs64"
    shutil.copytree(prepared_data, data)
    tree = json.loads(json.dumps(TEST_RECIPE))
    tree["data"].update(path=str(data), num_workers=0)
    tree["model"]["init_scheme"] = "reference"
    tree["train"]["max_steps"] = 3
    tree["runs_dir"] = str(tmp / "runs")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    run_pretrain(recipe, "--run_name", "sessa")
    done = subprocess.run([sys.executable, "-m", "checkpoints", "export", tmp / "runs" / "sessa", "--to", "hf",
                           "--out", tmp / "hf"], cwd=REPO, env=pretrain_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "top-1 mismatches: 0" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return {"tmp": tmp, "data": data, "recipe": recipe, "run": tmp / "runs" / "sessa", "hf": tmp / "hf"}
