"""Will calibration fit? An upper-bound estimate per device, checked before any work starts."""

from __future__ import annotations

import dataclasses

from models.config import LlamaConfig

F32 = 4


class CalibrationMemoryError(MemoryError):
    """Calibration would not fit in device memory; says what to change."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    activations: int        # block inputs and outputs, this device's share of the samples
    captured_inputs: int    # linear inputs of one step's samples, while statistics are computed
    block_scratch: int      # one sample through the block (attention scores, MLP)
    statistics: int         # Hessian accumulators (sum, step, integer limbs) of every input group
    kept_inputs: int = 0    # every group's inputs on every sample (AWQ's search), when kept
    fisher: int = 0         # the Fisher pass (`fisher`), when a method asks for it: this device's copy of the
                            # model, a window's gradient (param dtype) and its float32 square, F / devices, and
                            # the rematerialised blocks' inputs

    @property
    def total(self) -> int:
        return (self.activations + self.captured_inputs + self.block_scratch + self.statistics + self.kept_inputs
                + self.fisher)

    def describe(self) -> str:
        gib = lambda n: f"{n / 2 ** 30:.2f} GiB"
        return (f"activations {gib(self.activations)}, captured inputs {gib(self.captured_inputs)}, "
                f"block {gib(self.block_scratch)}, statistics {gib(self.statistics)}"
                + (f", kept inputs {gib(self.kept_inputs)}" if self.kept_inputs else "")
                + (f", Fisher information {gib(self.fisher)}" if self.fisher else ""))


def estimate(config: LlamaConfig, samples: int, length: int, local_batch: int, devices: int,
             keep_inputs: bool = False, float_path: bool = False, fisher_entries: int = 0,
             fisher_itemsize: int = F32, model_bytes: int = 0) -> MemoryEstimate:
    """keep_inputs: a method keeps the inputs of every input group on all samples (AWQ);
    float_path: a trained method needs the float model's activations too (twice the streams);
    fisher_entries: weights whose Fisher information a method asks for (SqueezeLLM), their
    gradient's bytes per entry fisher_itemsize (the param dtype's), in a model of model_bytes
    (copied to every device for the Fisher pass)."""
    c = config
    inputs = [c.hidden_size, c.num_heads * c.head_dim, c.hidden_size, c.intermediate_size]
    per_device = -(-samples // devices)
    return MemoryEstimate(
        activations=(4 if float_path else 2) * per_device * length * c.hidden_size * F32,
        captured_inputs=local_batch * length * sum(inputs) * F32,
        block_scratch=(c.num_heads * length * length + 3 * length * c.intermediate_size) * F32,
        statistics=sum(k * k for k in inputs) * 5 * F32,
        kept_inputs=samples * length * sum(inputs) * F32 if keep_inputs else 0,
        fisher=int(model_bytes + fisher_entries * (fisher_itemsize + F32 + F32 / devices)
                   + c.num_layers * length * c.hidden_size * F32) if fisher_entries else 0,
    )


def available_bytes(device) -> int | None:
    """Free memory of an accelerator, or the host's available RAM for CPU devices."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not report
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(config: LlamaConfig, samples: int, length: int, local_batch: int, devices: int, device,
               keep_inputs: bool = False, float_path: bool = False, fisher_entries: int = 0,
               fisher_itemsize: int = F32, model_bytes: int = 0) -> None:
    need = estimate(config, samples, length, local_batch, devices, keep_inputs, float_path, fisher_entries,
                    fisher_itemsize, model_bytes)
    have = available_bytes(device)
    if have is None:
        return
    shared_host = device.platform == "cpu"  # fake CPU devices share one RAM
    total = need.total * (devices if shared_host else 1)
    if total > have:
        where = "the host" if shared_host else f"{device.device_kind} {device.id}"
        raise CalibrationMemoryError(
            f"calibration of {samples} samples x {length} tokens needs about {total / 2 ** 30:.2f} GiB "
            f"({need.describe()}{', per device' if not shared_host else f', x {devices} devices'}) but {where} "
            f"has {have / 2 ** 30:.2f} GiB free; use fewer or shorter samples (--calib-samples, "
            f"--calib-len), a smaller step (--calib-step) or more devices (--devices)")
