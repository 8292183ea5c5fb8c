"""Routing-quality evaluation (`grpc-router eval`): labelled conversations in, accuracy, `other`
recall and latency out, in process or against a running server.

The modules, one job each: `dataset` reads and checks eval sets and routes files, `predictors`
answers one case (in process or over gRPC), `run` drives one eval run, `metrics` scores it,
`report` renders and writes the reports, `calibrate` fits the encoder's temperature and `other`
thresholds and draws the `other` curve, `progress` shows the progress line, `command` is the
`eval` sub-command and `lint` the `lint` one. The names below are the package's API; import them
from here.
"""

from grpc_router.evaluate.calibrate import (
    DEFAULT_QUANTILES,
    DEFAULT_THRESHOLDS,
    calibrate_encoder,
    fit_temperature,
    other_curve,
)
from grpc_router.evaluate.command import register_eval
from grpc_router.evaluate.dataset import (
    EvalCase,
    EvalDataError,
    load_cases,
    load_routes,
    route_name,
    without_examples,
)
from grpc_router.evaluate.metrics import compute_metrics
from grpc_router.evaluate.predictors import Prediction, Predictor, other_fit_summary
from grpc_router.evaluate.progress import ProgressBar
from grpc_router.evaluate.report import DEFAULT_OUT, curve_markdown, markdown_report
from grpc_router.evaluate.run import run_eval

__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_QUANTILES",
    "DEFAULT_THRESHOLDS",
    "EvalCase",
    "EvalDataError",
    "Prediction",
    "Predictor",
    "ProgressBar",
    "calibrate_encoder",
    "compute_metrics",
    "curve_markdown",
    "fit_temperature",
    "load_cases",
    "load_routes",
    "markdown_report",
    "other_curve",
    "other_fit_summary",
    "register_eval",
    "route_name",
    "run_eval",
    "without_examples",
]
