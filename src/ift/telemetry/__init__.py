from ift.telemetry.callback import TelemetryCallback, process_peak_rss_mb
from ift.telemetry.guard import NonFiniteGuard, NonFiniteStepError
from ift.telemetry.saved_tensors import SavedTensorCounter

__all__ = ["TelemetryCallback", "NonFiniteGuard", "NonFiniteStepError", "SavedTensorCounter", "process_peak_rss_mb"]
