from ift.telemetry.callback import TelemetryCallback, process_peak_rss_mb
from ift.telemetry.diagnostics import SolverDiagnostics
from ift.telemetry.guard import NonFiniteGuard, NonFiniteStepError
from ift.telemetry.saved_tensors import SavedTensorCounter

__all__ = ["TelemetryCallback", "SolverDiagnostics", "NonFiniteGuard", "NonFiniteStepError", "SavedTensorCounter", "process_peak_rss_mb"]
