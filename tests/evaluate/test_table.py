"""The paper's comparison: matched parameter counts of configs/paper/, and the table from real runs."""
import json
from pathlib import Path

import pytest
import yaml

from pretrain.evaluate.table import model_label, parameter_count, wall_time_s
from tests.evaluate.conftest import evaluate_cli
from tests.pretrain.conftest import REPO

PAPER = REPO / "configs" / "paper"


@pytest.mark.parametrize("task", ["two-style", "diffuse-mqar"])
def test_paper_models_have_matched_parameter_counts(task):
    from pretrain.config import load_config

    counts = {}
    for model in ("sessa", "transformer", "sessa-nofb"):
        config = load_config(PAPER / f"{task}-{model}.yaml", [])  # a valid recipe
        counts[model_label(config.model.to_dict())] = parameter_count(config.model.to_dict())
    assert set(counts) == {"Sessa", "Transformer++", "Sessa (no feedback)"}
    assert not PAPER.joinpath(f"{task}-sessa-nofb.yaml").read_text().count("feedback: true")
    reference = counts["Sessa"]
    for label, n in counts.items():
        assert abs(n - reference) / reference < 0.02, (label, n, reference)


def test_table_from_runs(runs, task_files, tmp_path):
    done = evaluate_cli("table", "--runs", runs["sessa"], runs["transformer"], "--tasks", task_files["generate"],
                        "--no-progress", "--out", tmp_path / "t.md", "--json", tmp_path / "t.json")
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["label"] for r in rows] == ["Sessa", "Transformer++"]
    config = yaml.safe_load((Path(runs["sessa"]) / "config.yaml").read_text())
    assert rows[0]["params"] == parameter_count(config["model"]) and rows[0]["tokens"] == 3 * 256
    assert rows[0]["wall_s"] == pytest.approx(wall_time_s(Path(runs["sessa"])))
    table = (tmp_path / "t.md").read_text()
    assert "generate (token_accuracy)" in table and table.strip() in done.stdout
    sessa_line = next(line for line in table.splitlines() if line.startswith("| Sessa |"))
    accuracy = rows[0]["results"]["generate"]["token_accuracy"]
    assert f"{accuracy:.3f} ± 0.000" in sessa_line and "| 1 |" in sessa_line
