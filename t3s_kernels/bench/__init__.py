"""Benchmarks of the fused loss against eager PyTorch, torch.compile and the peers: ``t3s bench``
(table.py, one shape; sweep.py, time and memory against N with plots), what is timed
(providers.py) and how (measure.py)."""

from ..validation import DTYPES
from .measure import device_name, matmul_floor, peak_memory_bytes, time_ms
from .providers import PROVIDERS, Inputs
from .table import CPU_DEFAULT, GPU_DEFAULT, Report, Row, format_report, report_json, run_bench

__all__ = ["CPU_DEFAULT", "DTYPES", "GPU_DEFAULT", "PROVIDERS", "Inputs", "Report", "Row", "device_name",
           "format_report", "matmul_floor", "peak_memory_bytes", "report_json", "run_bench", "time_ms"]
