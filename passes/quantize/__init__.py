"""Post-training quantization: calibration (observers, the calibration driver) and range → parameters."""
from lowbit.passes.quantize.calibration import (BatchedFeeds, CalibrationWarning, calibrate,
                                                load_calibration_npz)
from lowbit.passes.quantize.observers import (MASK_THRESHOLD, OBSERVERS, CalibrationError, Histogram, Observer,
                                              choose_qparams, entropy_threshold_bin, fake_quantize, make_observer,
                                              quant_limits, register_observer)

__all__ = [
    "calibrate", "load_calibration_npz", "BatchedFeeds", "CalibrationWarning", "CalibrationError",
    "Observer", "Histogram", "OBSERVERS", "register_observer", "make_observer", "MASK_THRESHOLD",
    "choose_qparams", "quant_limits", "fake_quantize", "entropy_threshold_bin",
]

from lowbit.passes.quantize.api import quantize  # noqa: E402
from lowbit.passes.quantize.quantizer import QuantizationError, QuantizeOptions  # noqa: E402
from lowbit.passes.quantize.realize import realize  # noqa: E402

__all__ += ["quantize", "realize", "QuantizeOptions", "QuantizationError"]
from lowbit.passes.quantize.report import LayerError, format_table, layer_errors, write_report  # noqa: E402

__all__ += ["LayerError", "layer_errors", "format_table", "write_report"]
