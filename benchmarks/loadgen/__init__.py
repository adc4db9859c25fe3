"""Load generator for serve_app's OpenAI API: the article's workload, closed/open loops, SLO sweeps.

``python -m benchmarks.loadgen --help``; see benchmarks/RESULTS.md for measured runs.
"""

from benchmarks.loadgen.client import LoadSpec, RequestResult, RunResult, SSEParser, run_load
from benchmarks.loadgen.metrics import (SLO_E2E_P95_S, SLO_TTFT_P95_S, ResourceSampler,
                                        engine_breakdown, percentile, slo_check, summarize)
from benchmarks.loadgen.sweep import SLO, SweepPlan, run_sweep
from benchmarks.loadgen.workload import (DEFAULT_CLASSES, Conversation, RequestClass, Workload,
                                         build_image_pool, poisson_arrivals)

__all__ = ["DEFAULT_CLASSES", "SLO", "SLO_E2E_P95_S", "SLO_TTFT_P95_S", "Conversation", "LoadSpec",
           "RequestClass", "RequestResult", "ResourceSampler", "RunResult", "SSEParser", "SweepPlan",
           "Workload", "build_image_pool", "engine_breakdown", "percentile", "poisson_arrivals",
           "run_load", "run_sweep", "slo_check", "summarize"]
