"""The `jaxq` command line: quantize, qat, eval, export, report, inspect."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

from jaxq import data, distributed, method_options
from jaxq.config import DEFAULT_PATTERN, ROTATIONS, ActivationConfig, KVCacheConfig, QATConfig, QuantConfig, Rule
from jaxq.methods import registry


QUICK_CTX, QUICK_WINDOWS = 512, 64  # PROTOCOL.md's quick evaluation, the defaults


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=data.EVAL_SOURCE,
                   help=f"evaluation text: {', '.join(data.SOURCES)} or a text file (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory holding wikitext2/ (default ${data.DATA_DIR_ENV} or ../shared/data)")
    p.add_argument("--ctx", type=int, default=QUICK_CTX, help="window length in tokens (quick: 512, full: 2048)")
    p.add_argument("--windows", type=int, default=QUICK_WINDOWS, help="number of windows (quick: 64)")
    p.add_argument("--full", action="store_true", help="full protocol: ctx 2048, every window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    p.add_argument("--data-parallel", type=int, default=1, help="split windows over this many devices")
    p.add_argument("--model-parallel", type=int, default=1, help="split each weight's outputs over this many devices")


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("several processes (jax.distributed: the same command on every host)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0, which serves the coordination service")
    group.add_argument("--num-processes", type=int, default=None, metavar="N")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0..N-1")
    group.add_argument("--peer-timeout", type=int, default=distributed.HEARTBEAT_TIMEOUT_S, metavar="S",
                       help="a process not heard from for S seconds ends the others (default %(default)s)")
    group.add_argument("--distributed-auto", action="store_true",
                       help="join the processes the platform starts (Cloud TPU pods, SLURM): "
                            "jax.distributed.initialize() without arguments")


def process_group(args: argparse.Namespace) -> distributed.ProcessGroup:
    """The `distributed.ProcessGroup` the options name."""
    return distributed.ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                                    auto=args.distributed_auto, peer_timeout_s=args.peer_timeout)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    method_options.add_method_options(p)
    p.add_argument("--keep-float", action="append", default=[], metavar="REGEX",
                   help="leave matching parameters in float (repeatable)")
    mixed = p.add_argument_group("mixed precision (bits per layer from a per-layer sensitivity)")
    mixed.add_argument("--bits-budget", type=float, default=None, metavar="BITS",
                       help="choose each layer's bits so the stored bits per weight average at most this "
                            "(codes, scales and zeros counted), minimising the predicted loss increase; "
                            "needs calibration data")
    mixed.add_argument("--bit-choices", type=_bit_choices, default=None, metavar="B,B,...",
                       help="bit widths a layer may get with --bits-budget (default 2,3,4,8)")
    mixed.add_argument("--sensitivity", default=None, choices=("fisher", "kl"),
                       help="how --bits-budget ranks layers: fisher (second-order estimate from the Fisher "
                            "information, the default) or kl (measured KL of quantizing each layer alone at each "
                            "width on --kl-windows calibration windows: len(bit choices) forwards per layer)")
    mixed.add_argument("--kl-windows", type=int, default=None, metavar="N",
                       help="calibration windows --sensitivity kl measures on (default 2)")
    model = p.add_argument_group("rotation, activations and KV cache (QuaRot's W4A4KV4)")
    model.add_argument("--rotate", default="none", choices=ROTATIONS,
                       help="rotate the residual stream first (hadamard: random Hadamard; random: Haar orthogonal) "
                            "and run the online Hadamard transforms (default %(default)s)")
    model.add_argument("--rotate-seed", type=int, default=0, help="seed of the residual rotation")
    model.add_argument("--a-bits", type=int, default=None, help="quantize every block linear's input per token to "
                                                                "this many bits (default: 16-bit inputs)")
    model.add_argument("--a-clip-ratio", type=float, default=ActivationConfig.clip_ratio,
                       help="dynamic activation range clip ratio (default %(default)s)")
    model.add_argument("--a-calibration", default="dynamic", choices=("dynamic", "minmax", "percentile", "kl"),
                       help="per-token dynamic ranges, or static per-tensor ranges calibrated on the calibration "
                            "data (default %(default)s)")
    model.add_argument("--a-percentile", type=float, default=ActivationConfig.percentile,
                       help="percentile of |x| a static range clips to (default %(default)s)")
    model.add_argument("--kv-bits", type=int, default=None, help="quantize the KV cache to this many bits")
    model.add_argument("--kv-clip-ratio", type=float, default=KVCacheConfig.clip_ratio,
                       help="KV-cache range clip ratio (default %(default)s)")
    cal = p.add_argument_group("calibration (data-aware methods)")
    cal.add_argument("--calib-data", default=data.CALIBRATION_SOURCE,
                     help="calibration text: a named source or a file (default %(default)s)")
    cal.add_argument("--calib-samples", type=int, default=32, help="windows (quick: 32, full: 128)")
    cal.add_argument("--calib-len", type=int, default=512, help="tokens per window")
    cal.add_argument("--calib-step", type=int, default=8, help="windows per step over all devices")
    cal.add_argument("--devices", type=int, default=None, help="devices to shard calibration over (default all)")
    cal.add_argument("--propagate", default=None, choices=("quantized", "float"),
                     help="next block's inputs from the quantized or the float block (default: the method's "
                          "recipe: quantized for GPTQ, float for AWQ)")
    cal.add_argument("--resume", default=None, metavar="DIR", help="save per-block progress here and resume from it")
    cal.add_argument("--data-dir", default=None, help=f"directory holding wikitext2/ (default ${data.DATA_DIR_ENV})")


def _bit_choices(text: str) -> tuple[int, ...]:
    """"2,3,4,8" -> (2, 3, 4, 8)."""
    try:
        return tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths separated by commas (2,3,4,8), got {text!r}") from None


CALIBRATION_OPTIONS = ("calib_data", "calib_samples", "calib_len", "calib_step", "devices", "propagate", "resume",
                       "data_dir")


class UsageError(ValueError):
    """Command-line options that contradict each other or do not apply."""


def check_quantize_options(args: argparse.Namespace) -> None:
    """Refuse options the chosen method or calibration would silently ignore."""
    ignored = method_options.not_applying(args.method, args)
    foreign = [flag for flag, condition in ignored if condition is None]
    if registry.registration(args.method).data_free and args.a_calibration == "dynamic" and args.bits_budget is None:
        # nothing calibrates
        defaults = vars(build_parser().parse_args(["quantize", "--model", "m", "--out", "o"]))
        foreign += ["--" + dest.replace("_", "-") for dest in CALIBRATION_OPTIONS if getattr(args, dest) != defaults[dest]]
    ignored += [(flag, condition) for flag, condition, unused in (
        ("--a-clip-ratio", "--a-bits", args.a_bits is None and args.a_clip_ratio != ActivationConfig.clip_ratio),
        ("--a-calibration", "--a-bits", args.a_bits is None and args.a_calibration != "dynamic"),
        ("--a-percentile", "--a-calibration percentile",
         args.a_calibration != "percentile" and args.a_percentile != ActivationConfig.percentile),
        ("--kv-clip-ratio", "--kv-bits", args.kv_bits is None and args.kv_clip_ratio != KVCacheConfig.clip_ratio),
        ("--rotate-seed", "--rotate", args.rotate == "none" and args.rotate_seed != 0),
        ("--bit-choices", "--bits-budget", args.bits_budget is None and args.bit_choices is not None),
        ("--sensitivity", "--bits-budget", args.bits_budget is None and args.sensitivity is not None),
        ("--kl-windows", "--sensitivity kl", args.sensitivity != "kl" and args.kl_windows is not None)) if unused]
    problems = [f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to --method {args.method}"]
    problems = problems[:1 if foreign else 0] + [f"{flag} does not apply without {condition}"
                                                 for flag, condition in ignored if condition is not None]
    if problems:
        raise UsageError("; ".join(problems))


def check_eval_options(args: argparse.Namespace) -> None:
    """Refuse evaluation options that another option overrides or that do not apply."""
    unused = []
    if args.full:
        overridden = (("--ctx", args.ctx, QUICK_CTX), ("--windows", args.windows, QUICK_WINDOWS))
        unused += [flag for flag, value, default in overridden if value != default]
    if args.data_dir is not None and args.data not in data.SOURCES:
        unused.append("--data-dir")
    if unused:
        raise UsageError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply with "
                         f"{'--full' if args.full else f'--data {args.data} (a file, not a named source)'}")
    if args.data_parallel < 1 or args.model_parallel < 1:
        raise UsageError("--data-parallel and --model-parallel must be at least 1")


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    method = method_options.build_config(args.method, args)
    rules = tuple(Rule(pattern, None) for pattern in args.keep_float) + (Rule(DEFAULT_PATTERN, method),)
    activations = None if args.a_bits is None else ActivationConfig(
        bits=args.a_bits, clip_ratio=args.a_clip_ratio, calibration=args.a_calibration, percentile=args.a_percentile)
    kv_cache = None if args.kv_bits is None else KVCacheConfig(bits=args.kv_bits, clip_ratio=args.kv_clip_ratio)
    return QuantConfig(rules=rules, activations=activations, kv_cache=kv_cache, rotate=args.rotate,
                       rotate_seed=args.rotate_seed)


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    import models
    from jaxq import checkpoint, quantization, report

    checkpoint.quiet_orbax_logs()
    check_quantize_options(args)
    cfg = quant_config_from_args(args)
    out = checkpoint.check_destination(args.out, overwrite=args.overwrite)
    lm = models.load(args.model)
    checkpoint.check_replaceable(out, lm.config, str(args.model), overwrite=args.overwrite)
    calib = None
    if quantization.needs_calibration(cfg) or args.bits_budget is not None:
        from jaxq import calibrate

        calib = calibrate.from_text(lm, args.calib_data, samples=args.calib_samples, length=args.calib_len,
                                    data_dir=args.data_dir, step_samples=args.calib_step, devices=args.devices,
                                    propagate=args.propagate, resume_dir=args.resume, progress=not args.quiet)
    start = time.perf_counter()
    allocation = None
    if args.bits_budget is not None:
        from jaxq import mixed_precision

        cfg, allocation = mixed_precision.mixed_precision_config(
            lm, cfg.rules[-1].method, calib, args.bits_budget, choices=args.bit_choices or mixed_precision.BIT_CHOICES,
            base=cfg, sensitivity=args.sensitivity or "fisher", kl_windows=args.kl_windows or mixed_precision.KL_WINDOWS)
        if not args.json:
            print(f"mixed precision: {allocation.bits_per_weight:.4f} bits per weight (budget {args.bits_budget}); "
                  "layers per bit width: " + ", ".join(f"{b}-bit {n}" for b, n in allocation.histogram().items()))
    quantized = quantization.quantize_model(lm, cfg, calib, progress=not args.quiet)
    seconds = time.perf_counter() - start
    qparams = quantized.params
    checkpoint.save(out, qparams, model_config=quantized.config, quant_config=cfg, tokenizer=lm.tokenizer,
                    source=str(args.model))
    sizes = report.size_report(qparams)
    summary = {"model": args.model, "out": str(out), "quant_config": cfg.to_dict(),
               "quantize_seconds": seconds,
               "calibration": None if calib is None else {"samples": int(calib.tokens.shape[0]),
                                                          "length": int(calib.tokens.shape[1]),
                                                          "source": args.calib_data}, "quantized_weights": len(sizes.quantized),
               "quantized_bytes": sizes.quantized_bytes, "quantized_bf16_bytes": sizes.quantized_bf16_bytes,
               "mixed_precision": None if allocation is None else {
                   "bits_budget": args.bits_budget, "sensitivity": args.sensitivity or "fisher",
                   "bits_per_weight": allocation.bits_per_weight,
                   "predicted_loss": allocation.predicted_loss, "bits": allocation.bits}}
    from jaxq import run_report

    reference = lm.params  # the float weights each quantized one replaced (rotated, where the model was)
    if cfg.rotate != "none":
        from jaxq.transforms import model_rotation

        reference = model_rotation.rotate(lm.config, lm.params, cfg.rotate, cfg.rotate_seed)[1]
    leaves = checkpoint.read_metadata(out)["leaves"]  # every process: opening a checkpoint is collective
    if not distributed.is_primary():  # the other processes took part in the save; process 0 reports
        return 0
    run_report.write_json(out / run_report.QUANTIZE_RECORD, run_report.quantize_record(
        summary, sizes, run_report.relative_errors(reference, qparams), leaves))
    if args.json:
        print(json.dumps(summary))
    else:
        print(sizes.table().splitlines()[-2])
        print(f"quantized in {seconds:.1f}s; checkpoint written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import jax

    import models
    from jaxq import checkpoint, evaluate

    check_eval_options(args)
    ctx, windows = (2048, None) if args.full else (args.ctx, args.windows)
    evaluate.check_options(ctx, windows, args.batch_size)
    if args.checkpoint:
        checkpoint.quiet_orbax_logs()
        saved = checkpoint.load(args.checkpoint, dtype=args.dtype)
        lm = saved.language_model()
    else:
        lm = models.load(args.model, dtype=args.dtype)
    mesh = None
    data_parallel = args.data_parallel
    if jax.process_count() > 1 and data_parallel == 1:  # several processes: windows over all their devices
        data_parallel = jax.device_count() // args.model_parallel
    if data_parallel * args.model_parallel > 1:
        from jaxq import sharding

        mesh = sharding.make_mesh(data=data_parallel, model=args.model_parallel)
    report = evaluate.perplexity_report(lm, lm.params, args.data, ctx=ctx, windows=windows,
                                        batch_size=args.batch_size, data_dir=args.data_dir,
                                        progress=not args.quiet, mesh=mesh)
    if not distributed.is_primary():  # every process computed the same report; process 0 prints it
        return 0
    name = args.checkpoint or args.model
    result = {"model": name, "data": args.data, **report.to_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name}: perplexity {report.ppl:.4f} on {args.data} "
              f"({report.windows} windows x {report.ctx} tokens, {report.seconds:.1f}s)")
    if args.checkpoint:  # the run's record beside it (`jaxq report`); a read-only checkpoint only warns
        from pathlib import Path

        from jaxq import run_report

        path = Path(args.checkpoint) / run_report.eval_record_name(args.data, report.ctx, report.windows)
        try:
            digest = run_report.weights_digest(saved.metadata["leaves"])
            run_report.write_json(path, {**result, "weights_digest": digest})
        except OSError as err:
            print(f"jaxq eval: warning: the result was not recorded in {path} ({err.strerror or err})", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from jaxq import checkpoint, report

    checkpoint.quiet_orbax_logs()
    metadata = checkpoint.read_model_metadata(args.checkpoint)
    sizes = report.size_report(checkpoint.abstract_params(metadata))
    if args.json:
        print(json.dumps({"jaxq_version": metadata["jaxq_version"], "source": metadata["source"],
                          "model_config": metadata["model_config"], "quant_config": metadata["quant_config"],
                          **sizes.to_dict()}))
        return 0
    c = metadata["model_config"]
    print(f"{args.checkpoint}: written by jaxq {metadata['jaxq_version']} from {metadata['source'] or '?'}")
    print("model: none recorded (a params tree saved without a model config)" if c is None else
          f"model: {c['architecture']}, {c['num_layers']} blocks, hidden {c['hidden_size']}, "
          f"MLP {c['intermediate_size']}, {c['num_heads']}/{c['num_kv_heads']} heads, vocab {c['vocab_size']}")
    if c is not None and any(c.get(k) for k in ("rotation", "activations", "kv_cache")):
        print("runs: " + ", ".join(part for part in (
            c.get("rotation") and f"{c['rotation']}-rotated with online Hadamard transforms",
            c.get("activations") and f"{c['activations']['bits']}-bit activations (" + (
                f"per token, clip {c['activations']['clip_ratio']}" if c["activations"]["calibration"] == "dynamic"
                else f"static {c['activations']['calibration']} ranges") + ")",
            c.get("kv_cache") and f"{c['kv_cache']['bits']}-bit KV cache (per token and head, clip "
                                  f"{c['kv_cache']['clip_ratio']})") if part))
    print(sizes.table())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jaxq import run_report

    for path in run_report.write_report(run_report.load_runs(args.runs), args.out):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxq import checkpoint
    from jaxq.interop import gguf as gguf_export

    checkpoint.quiet_orbax_logs()
    if args.hf is not None:
        from jaxq.interop import hf_quantized

        if args.tokenizer_pre is not None:
            raise UsageError("--tokenizer-pre applies to --gguf only")
        if args.format != "gptq" and args.gptq_version != 1:
            raise UsageError("--gptq-version applies to --format gptq only")
        hf_quantized.check_destination(args.hf, overwrite=args.overwrite)
        summary = hf_quantized.export_hf(checkpoint.load(args.checkpoint).language_model(), args.hf,
                                         fmt=args.format, gptq_version=args.gptq_version, overwrite=args.overwrite)
    else:
        if (args.format, args.gptq_version) != ("compressed-tensors", 1):
            raise UsageError("--format and --gptq-version apply to --hf only")
        summary = gguf_export.export_checkpoint(args.checkpoint, args.gguf, overwrite=args.overwrite,
                                                tokenizer_pre=args.tokenizer_pre)
    print(summary.describe())
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import models
    from jaxq import calibrate, checkpoint, qat, run_report

    checkpoint.quiet_orbax_logs()
    cfg = qat.QATConfig(steps=args.steps, batch_size=args.batch_size, weight_lr=args.weight_lr,
                        scale_lr=args.scale_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        clip_norm=args.clip_norm, seed=args.seed, save_every=args.save_every)
    out = checkpoint.check_destination(args.out, overwrite=args.overwrite)
    start = checkpoint.load(args.checkpoint)
    student = start.language_model()
    source = args.model or start.metadata.get("source")
    if not source:
        raise UsageError(f"{args.checkpoint} records no float model it came from; give it with --model")
    teacher = models.load(source)
    if args.train_data == "generated":
        tokens = qat.generated_windows(teacher, args.calib_samples, args.calib_len, seed=args.seed)
    else:
        tokens = calibrate.from_text(teacher, args.calib_data, samples=args.calib_samples, length=args.calib_len,
                                     data_dir=args.data_dir).tokens
    began = time.perf_counter()
    log = logging.getLogger("jaxq.qat")
    result = qat.train(student, teacher, tokens, cfg, resume_dir=args.resume, progress=not args.quiet,
                       on_step=lambda step, loss: log.info("qat step %d: loss %.6f", step + 1, loss))
    seconds = time.perf_counter() - began
    checkpoint.save(out, result.model.params, model_config=student.config, quant_config=start.quant_config,
                    tokenizer=student.tokenizer, source=str(source))
    summary = {"checkpoint": str(args.checkpoint), "model": str(source), "out": str(out),
               "qat_config": dataclasses.asdict(cfg), "train_data": args.train_data,
               "windows": list(tokens.shape), "tokens_seen": cfg.steps * cfg.batch_size * int(tokens.shape[1]),
               "train_seconds": seconds, "initial_loss": result.initial_loss, "steps": len(result.losses),
               "losses": list(result.losses)}
    run_report.write_json(out / "qat.json", summary)
    try:
        run_report.plot_loss_curve(result.losses, out / "loss_curve.png", initial=result.initial_loss)
    except run_report.ReportError as err:  # matplotlib missing: the run is done, say what is not
        print(f"jaxq qat: warning: no loss curve written: {err}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"QAT: {len(result.losses)} steps of {cfg.batch_size} x {tokens.shape[1]} tokens in {seconds:.0f}s, "
              f"distillation loss {result.initial_loss:.4f} -> {result.losses[-1]:.4f}; checkpoint written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxq", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", parents=[common], help="quantize a model and write an Orbax checkpoint")
    p.add_argument("--model", required=True, help="zoo name, HF directory, .gguf file or Hub id")
    p.add_argument("--out", required=True, help="checkpoint directory (a new step is written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint of another model at --out, or write into a non-empty directory")
    _add_method_options(p)
    _add_distributed_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("eval", parents=[common], help="perplexity of a model or checkpoint (PROTOCOL.md)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="zoo name, HF directory, .gguf file or Hub id")
    source.add_argument("--checkpoint", help="directory written by `jaxq quantize`")
    _add_eval_options(p)
    _add_distributed_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("qat", parents=[common], help="quantization-aware training of a checkpoint by distillation "
                                                     "from its float model (LLM-QAT)")
    p.add_argument("--checkpoint", required=True, help="a uniform-grid checkpoint written by `jaxq quantize`")
    p.add_argument("--out", required=True, help="checkpoint directory for the trained model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    p.add_argument("--model", default=None, help="the float model to distil from (default: the checkpoint's source)")
    defaults = QATConfig()
    train = p.add_argument_group("training")
    for flag, kind, help_text in (("--steps", int, "optimiser steps"), ("--batch-size", int, "windows per step"),
                                  ("--weight-lr", float, "AdamW's peak learning rate on the latent weights"),
                                  ("--scale-lr", float, "Adam's peak learning rate on log-scales and offsets"),
                                  ("--warmup-steps", int, "linear warm-up steps before the cosine decay"),
                                  ("--weight-decay", float, "AdamW's weight decay"),
                                  ("--clip-norm", float, "global gradient norm clipped to"),
                                  ("--seed", int, "batch order (and generated text)"),
                                  ("--save-every", int, "steps between saved training states (with --resume)")):
        dest = flag[2:].replace("-", "_")
        train.add_argument(flag, type=kind, default=getattr(defaults, dest), help=help_text + " (default %(default)s)")
    train.add_argument("--resume", default=None, metavar="DIR",
                       help="save the training state here (Orbax) and continue from it after a crash")
    data_options = p.add_argument_group("training text")
    data_options.add_argument("--train-data", default="calibration", choices=("calibration", "generated"),
                              help="calibration text, or text the float model generates (data-free; default "
                                   "%(default)s)")
    data_options.add_argument("--calib-data", default=data.CALIBRATION_SOURCE,
                              help="text source for --train-data calibration (default %(default)s)")
    data_options.add_argument("--calib-samples", type=int, default=32, help="windows (default %(default)s)")
    data_options.add_argument("--calib-len", type=int, default=512, help="tokens per window (default %(default)s)")
    data_options.add_argument("--data-dir", default=None, help=f"directory holding wikitext2/ (default ${data.DATA_DIR_ENV})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_qat)

    p = sub.add_parser("inspect", parents=[common], help="layers, formats, bits and bytes of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("report", parents=[common], help="markdown table and PNG plots of quantize/eval runs")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a checkpoint directory (its quantize.json and eval-*.json), one eval-*.json of one, or a "
                        "JSON-lines file of scripts/ppl_table.py rows")
    p.add_argument("--out", required=True, help="directory for report.md, ppl_vs_bits.png and a layers-<run>.png "
                                                "per checkpoint (plots need matplotlib: pip install 'jaxq[plots]')")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("export", parents=[common],
                       help="write a checkpoint in another format: a llama.cpp GGUF file or a Hugging Face directory")
    p.add_argument("--checkpoint", required=True, help="directory written by `jaxq quantize`")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--gguf", metavar="OUT", help="GGUF file to write (w4 g32 float-offset -> Q4_1, w4 g32 sym -> "
                                                      "Q4_0, w8 g32 sym -> Q8_0, float -> F32)")
    target.add_argument("--hf", metavar="DIR", help="Hugging Face directory to write (config.json with its "
                                                    "quantization_config, safetensors, tokenizer) for vLLM / transformers")
    p.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "gptq", "awq"),
                   help="--hf's format: compressed-tensors pack-quantized (symmetric; vLLM's main one), gptq "
                        "(integer zeros, act-order g_idx) or awq (4-bit groups, AutoAWQ's GEMM packing) "
                        "(default %(default)s)")
    p.add_argument("--gptq-version", type=int, default=1, choices=(1, 2),
                   help="GPTQ zero-point convention: 1 (checkpoint_format gptq, zeros minus one, what most "
                        "loaders expect) or 2 (gptq_v2) (default %(default)s)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre: llama-bpe for LLaMA-3, smollm for "
                        "SmolLM2), needed when the checkpoint's source is not a GGUF file with this vocabulary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=cmd_export)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the input and what to do: printed as one line."""
    from jaxq.calibrate import CalibrationError, CalibrationMemoryError
    from jaxq.calibrate.resume import ResumeMismatchError
    from jaxq.checkpoint import CheckpointError
    from jaxq.config import ConfigError
    from jaxq.data import DataError, DataNotFoundError
    from jaxq.distributed import DistributedError
    from jaxq.evaluate import EvaluationError
    from jaxq.interop.gguf import ExportError
    from jaxq.interop.hf_quantized import HFExportError
    from jaxq.methods.gptq import SingularHessianError
    from jaxq.qat import QATError
    from jaxq.quantization import NonFiniteWeightError
    from jaxq.run_report import ReportError
    from jaxq.sharding import MeshError
    from models import ModelNotFoundError, UnsupportedModelError

    return (UsageError, ConfigError, CalibrationError, CalibrationMemoryError, ResumeMismatchError,
            CheckpointError, DataError, DataNotFoundError, EvaluationError, MeshError, SingularHessianError,
            NonFiniteWeightError, ModelNotFoundError, UnsupportedModelError, QATError, ReportError, ExportError,
            HFExportError, DistributedError)


@contextlib.contextmanager
def _reports_above_progress_bars(log: logging.Logger) -> Iterator[None]:
    """What methods report at INFO (trained blocks' losses) printed once, above the progress bars:
    through tqdm's handler only, not also through a root handler an imported library installed."""
    log.setLevel(logging.INFO)
    propagate, log.propagate = log.propagate, False
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield
    finally:
        log.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (one line on stderr naming the problem), 1 an internal error
    (its traceback with --debug)."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "coordinator"):  # before anything touches a device
            distributed.initialize(process_group(args))
        with _reports_above_progress_bars(logging.getLogger("jaxq")):
            return args.run(args)
    except user_errors() as err:
        print(f"jaxq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(f"jaxq {args.command}: internal error: {type(err).__name__}: {err}\n"
              "This is a bug in jaxq, not in your input; rerun with --debug for the traceback and report it.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
