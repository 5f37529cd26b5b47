"""Calibration: block-by-block statistics (sharded over devices, summed exactly) that feed the
data-aware methods (GPTQ, AWQ)."""

from jaxq.calibrate.memory import CalibrationMemoryError
from jaxq.calibrate.sequential import Calibration, CalibrationError, from_text, run

__all__ = ["Calibration", "CalibrationError", "CalibrationMemoryError", "from_text", "run"]
