"""Hugging Face quantized directories: GPTQ v1/v2 read back by an unpacking written from the
format's documentation, compressed-tensors loaded by transformers itself, and jaxq's import of both."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
import models
from jaxq import calibrate, cli, tree
from jaxq.formats.uniform import UniformQ
from jaxq.interop import hf_quantized
from jaxq.interop.hf_quantized import HFExportError, HFImportError, pack_int32, unpack_int32
from tests.conftest import tiny_llama_config


def bit_stream_words(column: list[int], bits: int) -> list[int]:
    """The documented packing of one run of codes: one integer holding code i at bits [i*b, (i+1)*b),
    cut into 32-bit words, least significant first."""
    value = sum(int(c) << (i * bits) for i, c in enumerate(column))
    return [(value >> (32 * k)) & 0xFFFFFFFF for k in range(-(-len(column) * bits // 32))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_the_documented_bit_stream_along_either_axis(bits, rng):
    codes = rng.integers(0, 2 ** bits, size=(40, 6)).astype(np.uint8)
    along_rows = pack_int32(codes, bits, axis=0).view(np.uint32)
    along_cols = pack_int32(codes, bits, axis=1).view(np.uint32)
    for j in range(codes.shape[1]):
        assert along_rows[:, j].tolist() == bit_stream_words(codes[:, j].tolist(), bits)
    for i in range(codes.shape[0]):
        assert along_cols[i].tolist() == bit_stream_words(codes[i].tolist(), bits)
    assert np.array_equal(unpack_int32(along_rows.view(np.int32), bits, 40, axis=0), codes)
    assert np.array_equal(unpack_int32(along_cols.view(np.int32), bits, 6, axis=1), codes)


def random_uniform(rng, shape, bits, group_size, zero_point, act_order, zero_low=0):
    """A UniformQ with random codes, fp16 scales, integer zeros (from zero_low) or none, and a
    random perm."""
    k, n = shape
    groups = -(-k // group_size)
    codes = rng.integers(0, 2 ** bits, size=shape).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(groups, n)).astype(np.float16)
    zero = rng.integers(zero_low, 2 ** bits, size=(groups, n)).astype(np.uint8) if zero_point == "int" else None
    perm = rng.permutation(k).astype(np.int32) if act_order else None
    return UniformQ.from_codes(jnp.asarray(codes), jnp.asarray(scale), None if zero is None else jnp.asarray(zero),
                               bits=bits, group_size=group_size, dtype=jnp.float32, zero_point=zero_point,
                               perm=None if perm is None else jnp.asarray(perm))


def documented_gptq_dequantize(t: dict, bits: int, version: int) -> np.ndarray:
    """GPTQ's dequantization as its documentation states it, in numpy: [in, out] float32."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    qweight, qzeros = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    rows = np.arange(t["g_idx"].shape[0])
    q = (qweight[rows // per_word] >> (bits * (rows % per_word))[:, None]) & mask          # [in, out]
    cols = np.arange(t["scales"].shape[1])
    z = (qzeros[:, cols // per_word] >> (bits * (cols % per_word))[None]) & mask           # [groups, out]
    z = z + 1 if version == 1 else z  # v1 stores zero - 1 (readers add 1, unmasked)
    g = t["g_idx"]
    return ((q.astype(np.float32) - z[g].astype(np.float32)) * t["scales"][g].astype(np.float32))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bits,zero_point,act_order", [(4, "int", True), (4, "none", False), (2, "int", False),
                                                       (8, "none", True)])
def test_gptq_export_reads_back_with_the_documented_unpacking(version, bits, zero_point, act_order, rng):
    """The exported tensors, unpacked as GPTQ documents them, give jaxq's dequantized weights
    (exactly: the same fp16 scales times the same integers); importing them gives the same codes
    in input order, zeros and scales, and act-order's groups back."""
    q = random_uniform(rng, (96, 48), bits, 32, zero_point, act_order, zero_low=1 if version == 1 else 0)
    t = hf_quantized.gptq_tensors(q, version)
    assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == np.int32 and t["scales"].dtype == np.float16
    assert t["qweight"].shape == (96 * bits // 32, 48) and t["qzeros"].shape == (3, 48 * bits // 32)
    expected = np.asarray(q.dequantize(jnp.float32))
    assert np.array_equal(documented_gptq_dequantize(t, bits, version), expected)
    scheme = hf_quantized.scheme_of(q)
    back = hf_quantized.from_gptq(t, scheme, version, "m", "float32")
    assert np.array_equal(np.asarray(back.dequantize(jnp.float32)), expected)
    in_order = lambda u: np.asarray(u.stored_codes())[np.argsort(np.asarray(u.perm))] if u.perm is not None \
        else np.asarray(u.stored_codes())
    assert np.array_equal(in_order(back), in_order(q))
    assert np.array_equal(np.asarray(back.scale), np.asarray(q.scale))
    assert (back.zero is None) == (q.zero is None) and (q.zero is None or np.array_equal(back.zero, q.zero))
    assert (back.perm is not None) == act_order


def documented_awq_dequantize(t: dict) -> np.ndarray:
    """AutoAWQ GEMM's dequantization as documented: nibble i of word c is output column
    8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; [in, out] float32 with groups of in / groups rows."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        words = words.view(np.uint32)
        out = np.zeros((words.shape[0], words.shape[1] * 8), np.int64)
        for c in range(words.shape[1]):
            for i in range(8):
                out[:, 8 * c + order[i]] = (words[:, c] >> (4 * i)) & 0xF
        return out

    q, z, s = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].astype(np.float32)
    g = np.arange(q.shape[0]) // (q.shape[0] // s.shape[0])
    return (q - z[g]).astype(np.float32) * s[g]


@pytest.mark.parametrize("zero_point", ["int", "none"])
def test_awq_export_reads_back_with_the_documented_unpacking(zero_point, rng):
    q = random_uniform(rng, (128, 48), 4, 32, zero_point, False)
    t = hf_quantized.awq_tensors(q)
    assert t["qweight"].shape == (128, 6) and t["qzeros"].shape == (4, 6) and t["scales"].shape == (4, 48)
    expected = np.asarray(q.dequantize(jnp.float32))
    assert np.array_equal(documented_awq_dequantize(t), expected)
    back = hf_quantized.from_awq(t, hf_quantized.Scheme(4, 32, False, False), "m", "float32")
    assert np.array_equal(np.asarray(back.stored_codes()), np.asarray(q.stored_codes()))
    assert np.array_equal(np.asarray(back.dequantize(jnp.float32)), expected)


def test_a_mislabelled_gptq_version_is_caught_naming_the_fix(rng):
    q = random_uniform(rng, (64, 16), 4, 32, "none", False)
    scheme = hf_quantized.scheme_of(q)
    for written, labelled in ((1, 2), (2, 1)):
        with pytest.raises(HFImportError, match="checkpoint_format is wrong"):
            hf_quantized.from_gptq(hf_quantized.gptq_tensors(q, written), scheme, labelled, "m", "float32")


def test_gptq_v1_refuses_the_zero_point_it_cannot_hold(rng):
    """v1 stores zero - 1: a zero of 0 would be a -1 that readers decode differently (AutoGPTQ and
    vLLM as 16, GPTQModel with a carry into the next column), so v1 refuses it both ways and v2
    takes it."""
    q = random_uniform(rng, (64, 16), 4, 32, "int", False)
    assert np.any(np.asarray(q.zero) == 0)
    with pytest.raises(HFExportError, match="zero point of 0.*--gptq-version 2"):
        hf_quantized.gptq_tensors(q, 1)
    t = hf_quantized.gptq_tensors(q, 2)
    scheme = hf_quantized.scheme_of(q)
    with pytest.raises(HFImportError, match="v1 checkpoint storing 15"):
        hf_quantized.from_gptq(t, scheme, 1, "m", "float32")  # v2's 0 read as a v1 -1 wrapped to 15
    assert np.array_equal(np.asarray(hf_quantized.from_gptq(t, scheme, 2, "m", "float32").zero), np.asarray(q.zero))


def test_what_a_format_cannot_hold_is_an_error_listing_what_exports(rng):
    float_offset = UniformQ.from_codes(jnp.zeros((64, 8), jnp.uint8), jnp.ones((2, 8), jnp.float16),
                                       jnp.zeros((2, 8), jnp.float16), bits=4, group_size=32, dtype=jnp.float32,
                                       zero_point="float")
    with pytest.raises(HFExportError, match="float offset.*--gguf"):
        hf_quantized.gptq_tensors(float_offset, 1, "w")
    with pytest.raises(HFExportError, match="3-bit weights do not export to GPTQ"):
        hf_quantized.gptq_tensors(random_uniform(rng, (64, 8), 3, 32, "int", False), 1, "w")
    with pytest.raises(HFExportError, match="--static-groups"):
        hf_quantized.compressed_tensors_tensors(random_uniform(rng, (64, 8), 4, 32, "none", True), "w")
    with pytest.raises(HFExportError, match="asymmetric"):
        hf_quantized.compressed_tensors_tensors(random_uniform(rng, (64, 8), 4, 32, "int", False), "w")
    with pytest.raises(HFExportError, match="groups that divide the input size"):
        hf_quantized.gptq_tensors(random_uniform(rng, (80, 8), 4, 32, "none", False), 1, "w")
    with pytest.raises(HFExportError, match="36 outputs do not divide"):
        hf_quantized.awq_tensors(random_uniform(rng, (64, 36), 4, 32, "none", False), "w")
    with pytest.raises(HFExportError, match="outside fp16's range"):
        hf_quantized.to_fp16(np.array([1.0, 1e6]), "w")
    with pytest.raises(HFExportError, match="AWQ has no act-order"):
        hf_quantized.awq_tensors(random_uniform(rng, (64, 8), 4, 32, "int", True), "w")
    with pytest.raises(HFExportError, match="do not export to AWQ"):
        hf_quantized.awq_tensors(random_uniform(rng, (64, 8), 2, 32, "int", False), "w")
    with pytest.raises(HFImportError, match="quant_method 'bitsandbytes'"):
        hf_quantized.scheme_from_config({"quant_method": "bitsandbytes"})
    with pytest.raises(HFImportError, match="version 'gemv'"):
        hf_quantized.scheme_from_config({"quant_method": "awq", "version": "gemv"})
    with pytest.raises(HFImportError, match="format 'float-quantized'"):
        hf_quantized.scheme_from_config({"quant_method": "compressed-tensors", "format": "float-quantized"})


def logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def jaxq_logits(lm, tokens):
    return np.asarray(models.language_model.forward(lm.config, lm.params, jnp.asarray(tokens, jnp.int32))[0])


def test_gptq_static_groups_export_to_compressed_tensors_loads_in_transformers(tiny_llama_with_tokenizer, tmp_path):
    """jaxq GPTQ 4-bit act-order static groups, symmetric (g16: the tiny model's 64/112 inputs),
    exported to compressed-tensors: transformers' loader gives the logits of jaxq's model on the
    same directory (float32 both; 1e-4: summation order), and jaxq's import is that model, its
    codes the exported ones and its weights the quantized ones to fp16 rounding of the scales."""
    import torch
    import transformers

    directory, text = tiny_llama_with_tokenizer
    lm = models.load(directory)
    cal = calibrate.from_text(lm, str(text), samples=4, length=32, step_samples=4, progress=False)
    method = jaxq.GPTQConfig(uniform=jaxq.UniformConfig(bits=4, group_size=16, symmetric=True), act_order=True,
                             static_groups=True)
    quantized = lm.replace(params=jaxq.quantize(lm.params, method, cal))
    out = tmp_path / "ct"
    summary = hf_quantized.export_hf(quantized, out)
    assert summary.quantized == 14
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 16
    imported = models.load(out)
    ours, theirs = dict(tree.flatten(quantized.params)[0]), dict(tree.flatten(imported.params)[0])
    for path, q in ours.items():
        if tree.is_format(q):
            assert np.array_equal(np.asarray(theirs[path].stored_codes()), np.asarray(q.stored_codes())), path
            np.testing.assert_allclose(np.asarray(theirs[path].dequantize(jnp.float32)),
                                       np.asarray(q.dequantize(jnp.float32)), rtol=1e-3, atol=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.asarray(cal.tokens[:2])
    np.testing.assert_allclose(logits(hf, tokens), jaxq_logits(imported, tokens), atol=1e-4, rtol=1e-4)

    # groups that follow the permutation: GPTQ only, g_idx <-> perm through a whole directory
    dynamic = lm.replace(params=jaxq.quantize(lm.params, jaxq.GPTQConfig(
        uniform=jaxq.UniformConfig(bits=4, group_size=16, symmetric=True), act_order=True), cal))
    with pytest.raises(HFExportError, match="--static-groups"):
        hf_quantized.export_hf(dynamic, tmp_path / "no", fmt="compressed-tensors")
    hf_quantized.export_hf(dynamic, tmp_path / "gptq", fmt="gptq", gptq_version=2)
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["desc_act"]
    from_gptq = models.load(tmp_path / "gptq")
    for path, q in tree.flatten(dynamic.params)[0]:
        if tree.is_format(q):
            back = dict(tree.flatten(from_gptq.params)[0])[path]
            assert back.perm is not None
            np.testing.assert_array_equal(np.asarray(back.dequantize(jnp.float32)), np.asarray(q.dequantize(jnp.float32)))
    # the export rounds embeddings, norms and head to fp16 (relative 4.9e-4) on logits of |x| <= ~5: 5e-3
    np.testing.assert_allclose(jaxq_logits(from_gptq, tokens), jaxq_logits(dynamic, tokens), atol=5e-3)


def test_a_directory_written_by_compressed_tensors_imports_with_transformers_logits(tmp_path):
    """A tiny LLaMA quantized with compressed-tensors' own API (symmetric 4-bit g16; the scales
    set from each group's max |w| / 7, as no observer library is installed) and packed by its
    ModelCompressor: jaxq's import gives transformers' logits on the same directory (float32
    scales kept as stored; 1e-4: summation order)."""
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                out, inputs = module.weight.shape
                module.weight_scale.copy_(module.weight.reshape(out, inputs // 16, 16).abs().amax(-1) / 7)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(tmp_path / "ct"))
    compressor.update_config(str(tmp_path / "ct"))

    imported = models.load(tmp_path / "ct", tokenizer=False)
    kernels = [leaf for path, leaf in tree.flatten(imported.params)[0] if tree.is_format(leaf)]
    assert len(kernels) == 14 and all(q.bits == 4 and q.group_size == 16 and q.zero_point == "none" for q in kernels)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 257, size=(2, 24))
    np.testing.assert_allclose(jaxq_logits(imported, tokens), logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_cli_exports_gptq_and_keeps_an_existing_directory(tiny_llama_with_tokenizer, tmp_path, capsys):
    directory, _ = tiny_llama_with_tokenizer
    lm = models.load(directory)
    params = jaxq.quantize(lm.params, jaxq.UniformConfig(bits=4, group_size=16))
    jaxq.save(tmp_path / "ckpt", params, model_config=lm.config, tokenizer=lm.tokenizer, source=directory)
    out = tmp_path / "gptq"
    argv = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(out), "--format", "gptq",
            "--gptq-version", "2"]
    assert cli.main(argv) == 0
    assert "gptq, 14 quantized linears" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2" and not config["quantization_config"]["sym"]
    back = dict(tree.flatten(models.load(out).params)[0])
    for path, q in tree.flatten(params)[0]:
        if tree.is_format(q):
            assert np.array_equal(np.asarray(back[path].stored_codes()), np.asarray(q.stored_codes()))
            assert np.array_equal(np.asarray(back[path].zero), np.asarray(q.zero))
    awq = tmp_path / "awq"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(awq), "--format", "awq"]) == 0
    capsys.readouterr()
    assert json.loads((awq / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    from_awq = dict(tree.flatten(models.load(awq).params)[0])
    assert all(np.array_equal(np.asarray(from_awq[p].dequantize(jnp.float32)), np.asarray(q.dequantize(jnp.float32)))
               for p, q in tree.flatten(params)[0] if tree.is_format(q))
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert cli.main(argv + ["--overwrite", "--tokenizer-pre", "smollm"]) == 2
    assert "--tokenizer-pre applies to --gguf only" in capsys.readouterr().err
    ct = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "ct")]
    assert cli.main(ct) == 2  # compressed-tensors of an asymmetric grid: refused, nothing written
    assert "asymmetric compressed-tensors" in capsys.readouterr().err and not (tmp_path / "ct").exists()


@pytest.mark.slow
def test_smollm2_exported_to_compressed_tensors_runs_in_transformers(smollm, tmp_path):
    """smollm2-135m, symmetric 4-bit g64 (compressed-tensors' loader needs groups dividing the
    576 inputs, so not g128, which is refused; RTN: the export path is GPTQ's, whose calibration
    would add minutes), exported to compressed-tensors: transformers' logits on 2 windows of 128
    calibration tokens equal jaxq's on the same directory (float32; 1e-3 absolute on logits of
    ~±30 after 30 blocks: summation order) and the NLL agrees to 0.1%."""
    import torch
    import transformers

    g128 = jaxq.quantize(smollm.params, jaxq.UniformConfig(bits=4, group_size=128, symmetric=True))
    with pytest.raises(HFExportError, match="groups that do not divide the input size.*576 inputs"):
        hf_quantized.export_hf(smollm.replace(params=g128), tmp_path / "g128")
    assert not (tmp_path / "g128").exists()
    params = jaxq.quantize(smollm.params, jaxq.UniformConfig(bits=4, group_size=64, symmetric=True))
    out = tmp_path / "smollm2-ct"
    hf_quantized.export_hf(smollm.replace(params=params), out)
    imported = models.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.asarray(calibrate.from_text(smollm, samples=2, length=128, progress=False).tokens)
    theirs, ours = logits(hf, tokens), jaxq_logits(imported, tokens)
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=1e-3)

    def nll(x):
        x = x[:, :-1].astype(np.float64)
        logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        return -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    assert nll(theirs) == pytest.approx(nll(ours), rel=1e-3)
