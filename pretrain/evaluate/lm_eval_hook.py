"""Imported at interpreter start-up by the `.pth` file of `python -m pretrain.evaluate install-lm-eval`
(`install_plugin`, here so that installing imports neither lm-eval nor torch): registers the lm-eval
model `sessa` (pretrain/evaluate/harness.py) lazily, right after lm-eval's own `lm_eval.models` fills
its registry. Importing this module imports nothing heavy."""
import importlib.util
import site
import sys
from pathlib import Path

TARGET = "pretrain.evaluate.harness:SessaEvalLM"
REPO = Path(__file__).resolve().parents[2]
PLUGIN_NAME = "sessa_lm_eval.pth"


def install_plugin(site_dir: str | None = None) -> Path:
    """Write the .pth file that makes `lm_eval --model sessa` work in this environment."""
    site_dir = Path(site_dir or site.getsitepackages()[0])
    path = site_dir / PLUGIN_NAME
    path.write_text(f"{REPO}\nimport pretrain.evaluate.lm_eval_hook\n")  # a path line, then an import line
    return path


class RegisterAfterImport:
    """Meta-path finder that wraps the loading of `lm_eval.models` to add `sessa` to the registry."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # find the real module; this hook's job is then done
        spec = importlib.util.find_spec(fullname)
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            from lm_eval.api.registry import model_registry

            if "sessa" not in model_registry:
                model_registry.register("sessa", target=TARGET)

        spec.loader.exec_module = exec_module
        return spec


if "lm_eval.models" not in sys.modules and not any(isinstance(h, RegisterAfterImport) for h in sys.meta_path):
    sys.meta_path.insert(0, RegisterAfterImport())
