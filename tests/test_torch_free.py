"""No runtime code path imports torch: the main job must work where only the package's own
dependencies are installed (the test extra brings torch; users of the main job do not have it).

Each check runs in a subprocess where torch is made absent the way Python sees a missing
package: `sys.modules["torch"] = None`, so `import torch` raises ImportError and
`importlib.util.find_spec("torch")` is None (transformers then reports torch unavailable).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from models import zoo
from tests.conftest import REQUIRE_MODEL_ENV

PRELUDE = """
import sys
sys.modules["torch"] = None
"""
EPILOGUE = """
loaded = sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None})
assert "torch" not in loaded, loaded
"""


def run_without_torch(body: str) -> str:
    code = PRELUDE + textwrap.dedent(body) + EPILOGUE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_blocker_really_hides_torch():
    out = run_without_torch("""
        import importlib.util
        try:
            import torch
        except ImportError:
            print("blocked", importlib.util.find_spec("torch"))
    """)
    assert out.strip() == "blocked None"


def test_real_gguf_model_loads_and_tokenizes_without_torch():
    try:
        zoo.resolve("smollm2-135m")
    except zoo.ModelNotFoundError as err:
        if os.environ.get(REQUIRE_MODEL_ENV):
            raise
        pytest.skip(str(err))
    out = run_without_torch("""
        import json, jaxq, models
        lm = models.load("smollm2-135m")
        ids = lm.encode("The quick brown fox")
        print(json.dumps({"ids": ids, "layers": lm.config.num_layers, "text": lm.tokenizer.decode(ids)}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["layers"] == 30 and result["text"] == "The quick brown fox" and len(result["ids"]) == 4


def test_quantize_and_eval_without_torch(tiny_llama_with_tokenizer, tmp_path):
    directory, text = tiny_llama_with_tokenizer
    out_dir = tmp_path / "w4"
    out = run_without_torch(f"""
        from jaxq import cli
        assert cli.main(["quantize", "--model", {directory!r}, "--method", "gptq", "--bits", "4",
                         "--group-size", "32", "--calib-data", {str(text)!r}, "--calib-samples", "4", "--calib-step", "4",
                         "--calib-len", "32", "--out", {str(out_dir)!r}, "--quiet"]) == 0
        assert cli.main(["eval", "--checkpoint", {str(out_dir)!r}, "--data", {str(text)!r}, "--ctx", "32",
                         "--windows", "3", "--json", "--quiet"]) == 0
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] == 3 and 1.0 < result["ppl"] < 1e4
