"""`import netpress` stays lean: no optional heavy dependency is imported."""

import subprocess
import sys


def test_import_is_lean():
    code = ("import sys, netpress\n"
            "heavy = ['onnxruntime', 'onnx', 'sklearn', 'transformers', 'PIL', 'optuna', 'ray',"
            " 'matplotlib']\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at `import netpress`: {out.stdout.strip()}"


def test_subpackages_load_lazily():
    import netpress as npr

    assert npr.measure.ClassificationTask().name == "classification"
    assert callable(npr.export.load_artefact)
