"""Quantize with calibration sharded over devices, then evaluate sharded; prints one JSON line.

    # 8 CPU devices faked on one host (how the tests check that 8 devices give 1 device's codes)
    python scripts/calibrate_multidevice.py --model smollm2-135m --method gptq --bits 3 \\
        --fake-cpu-devices 8 --devices 8 --out runs/gptq3-8dev
    # several hosts: the same command on every host, plus the coordinator (process 0's address)
    python scripts/calibrate_multidevice.py ... --coordinator HOST:PORT --num-processes N --process-id I

Calibration statistics are summed exactly (jaxq.calibrate.stats), so the codes do not depend on
--devices. Evaluation splits windows over a "data" axis and weights over a "model" axis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse() -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest: the method options (`jaxq quantize`'s --method,
    --bits, ...), parsed once jax may be imported (`method_options`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib-data", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--calib-step", type=int, default=8)
    p.add_argument("--devices", type=int, default=None, help="devices for calibration (default all)")
    p.add_argument("--eval-data", default="wikitext2")
    p.add_argument("--eval-ctx", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--model-parallel", type=int, default=1, help="shards of each weight's output axis at eval")
    p.add_argument("--out", default=None, help="write the quantized checkpoint here")
    p.add_argument("--fake-cpu-devices", type=int, default=None, help="pretend the host CPU is N devices")
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator address (multi-host)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--peer-timeout", type=int, default=None, help="seconds a silent process may take before the "
                                                                  "others end (default jaxq.distributed's 30)")
    return p.parse_known_args()


def main() -> None:
    args, method_argv = parse()
    if args.fake_cpu_devices:  # must happen before jax initialises its backends
        # XLA:CPU's fusion emitters compile fused row reductions differently for different
        # per-device batch sizes (last-bit differences in the block forward); the classic
        # emitters do not, so 1 and N fake devices can be compared bit for bit.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
                                   f" --xla_force_host_platform_device_count={args.fake_cpu_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    import jaxq
    import models
    from jaxq import calibrate, checkpoint, distributed, evaluate, method_options, sharding

    distributed.initialize(distributed.ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                                                    peer_timeout_s=args.peer_timeout or distributed.HEARTBEAT_TIMEOUT_S))

    methods = argparse.ArgumentParser(prog="calibrate_multidevice.py (method options)")
    method_options.add_method_options(methods)
    method_args = methods.parse_args(method_argv)
    checkpoint.quiet_orbax_logs()
    lm = models.load(args.model)
    cfg = jaxq.QuantConfig.for_method(method_options.build_config(method_args.method, method_args))
    calib = calibrate.from_text(lm, args.calib_data, samples=args.calib_samples, length=args.calib_len,
                                step_samples=args.calib_step, devices=args.devices, progress=False)
    start = time.perf_counter()
    qparams = jax.block_until_ready(jaxq.quantize(lm.params, cfg, calib))
    seconds = time.perf_counter() - start
    if args.out:
        checkpoint.save(args.out, qparams, model_config=lm.config, quant_config=cfg, tokenizer=lm.tokenizer,
                        source=args.model)
    devices = len(jax.devices())
    mesh = sharding.make_mesh(data=devices // args.model_parallel, model=args.model_parallel)
    report = evaluate.perplexity_report(lm, qparams, args.eval_data, ctx=args.eval_ctx, windows=args.eval_windows,
                                        batch_size=args.eval_batch, progress=False, mesh=mesh)
    if not distributed.is_primary():
        return
    json.dump({"devices": devices, "processes": jax.process_count(), "calibration_devices": calib.devices or devices, "mesh": dict(mesh.shape),
               "quantize_seconds": seconds, "ppl": report.ppl, "eval_windows": report.windows,
               "calibration_samples": int(calib.tokens.shape[0])}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
