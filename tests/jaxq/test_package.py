"""`import jaxq` is light; the documented submodules are attributes all the same (PEP 562)."""

import subprocess
import sys

import pytest

import jaxq

HEAVY = ("jaxq.calibrate", "jaxq.evaluate", "jaxq.data", "jaxq.sharding", "jaxq.cli", "jaxq.checkpoint",
         "jaxq.quantization", "models", "kernels_pallas")
# Every module must import first, in a fresh interpreter: none relies on another being imported
# before it (the layers in jaxq/__init__'s docstring have no cycle).
FIRST_IMPORTS = ("jaxq", "models", "kernels_pallas", "jaxq.ops", "jaxq.checkpoint", "jaxq.quantization",
                 "jaxq.calibrate", "jaxq.calibrate.resume", "jaxq.cli", "jaxq.evaluate", "jaxq.methods.awq",
                 "jaxq.methods.registry", "jaxq.method_options", "jaxq.formats.codebook", "models.llama",
                 "models.config", "models.kv_cache", "jaxq.formats.kv", "jaxq.transforms.model_rotation",
                 "jaxq.methods.obr", "jaxq.formats.pruned", "jaxq.calibrate.activation_ranges",
                 "jaxq.mixed_precision", "jaxq.qat", "jaxq.interop.gguf", "jaxq.run_report")


def test_import_does_not_load_heavy_submodules():
    code = "import sys, jaxq; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


@pytest.mark.parametrize("module", FIRST_IMPORTS)
def test_every_module_imports_first(module):
    code = f"import {module}, jaxq; jaxq.quantize, jaxq.save, jaxq.methods.registry.method(jaxq.GPTQConfig())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", jaxq._SUBMODULES)
def test_submodules_are_attributes(name):
    module = getattr(jaxq, name)
    assert module.__name__ == f"jaxq.{name}" and name in dir(jaxq)


def test_documented_call_forms():
    assert callable(jaxq.evaluate.perplexity) and callable(jaxq.calibrate.from_text)
    assert callable(jaxq.methods.rtn.quantize_weight)
    from jaxq import load, quantize, save, size_report  # functions imported on first use

    assert jaxq.quantize is quantize and callable(load) and callable(save) and callable(size_report)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'evaluat'"):
        jaxq.evaluat  # noqa: B018
