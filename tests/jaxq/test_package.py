"""`import jaxq` is light; the documented submodules are attributes all the same (PEP 562)."""

import subprocess
import sys

import pytest

import jaxq

HEAVY = ("calibrate", "evaluate", "data", "sharding", "cli")


def test_import_does_not_load_heavy_submodules():
    code = "import sys, jaxq; print(' '.join(m for m in %r if f'jaxq.{m}' in sys.modules))" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


@pytest.mark.parametrize("name", jaxq._SUBMODULES)
def test_submodules_are_attributes(name):
    module = getattr(jaxq, name)
    assert module.__name__ == f"jaxq.{name}" and name in dir(jaxq)


def test_documented_call_forms():
    assert callable(jaxq.evaluate.perplexity) and callable(jaxq.calibrate.from_text)
    assert callable(jaxq.methods.rtn.quantize_weight)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'evaluat'"):
        jaxq.evaluat  # noqa: B018
