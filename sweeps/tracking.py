"""MLflow tracking of a sweep's trials (``tracking: {mlflow: URI}`` in the sweep file; optional:
``pip install 'dartsweep[mlflow]'``).

Ray Tune's own ``MLflowLoggerCallback`` does the logging, one MLflow run per trial in an experiment named
after the sweep; this subclass gives it what a NAS researcher filters on: flat parameters (op set, F,
genotype, layers, seed and the stage's training settings, rather than the raw nested config), the epoch
as the step of every metric, each epoch once, and the trial's genotype as an artifact (``genotype.json``:
the cell a search derived, or the cell an eval trial trained). Tracking never fails a trial: a server that
is unreachable at the start, or errs later, is one warning on the driver's console, and the sweep goes on
untracked.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

from ray.air.integrations.mlflow import MLflowLoggerCallback

from sweeps.loggers import REPLAYED


def _warn(message: str) -> None:
    print(f"[dartsweep] warning: {message}", file=sys.stderr, flush=True)


def reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None when the tracking server at an http(s) ``uri`` answers its health check; else why not. Other
    URIs (a local folder, databricks) are left to MLflow."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except Exception as exc:  # noqa: BLE001 - any failure to answer means untracked
        return f"{type(exc).__name__}: {exc}"


class MLflowTracker(MLflowLoggerCallback):
    """Ray's MLflow callback, made safe (see the module docstring). ``genotypes``: the eval stage's table
    (id -> entry with ``genotype``), for the eval trials' artifact."""

    def __init__(self, uri: str, experiment: str, genotypes: Mapping[str, Any] | None = None) -> None:
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags={"dartsweep.sweep": experiment})
        self._genotypes = dict(genotypes or {})
        self._off = False
        self._last: dict[Any, int] = {}
        self._final: dict[Any, dict] = {}

    def _fail(self, what: str, exc: BaseException) -> None:
        if not self._off:
            _warn(f"MLflow at {self.tracking_uri}: {what} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "the sweep goes on, no longer tracked there")
        self._off = True

    def setup(self, *args: Any, **kwargs: Any) -> None:
        why = reachable(self.tracking_uri)
        if why is not None:
            self._off = True
            _warn(f"MLflow at {self.tracking_uri} does not answer ({why}); the sweep runs untracked there")
            return
        try:
            super().setup(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fail("setting up the experiment", exc)

    def log_trial_start(self, trial: Any) -> None:
        if self._off:
            return
        try:
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial)}
                run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=_params(trial.config))
        except Exception as exc:  # noqa: BLE001
            self._fail("starting a run", exc)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if self._off:
            return
        epoch = result.get("epoch")
        if result.get(REPLAYED) or not isinstance(epoch, (int, float)) or epoch <= self._last.get(trial, 0):
            return  # each epoch once (a restored trial trains some again; the replay is the driver's)
        try:
            if trial not in self._trial_runs:
                self.log_trial_start(trial)
            if trial not in self._final:  # what the trial reports of itself: the op set's id, the F it used
                fixed = {k: result[k] for k in REPORTED if result.get(k) is not None}
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=fixed)
            metrics = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool) and math.isfinite(v) and k not in ("epoch", "pid", "timestamp")}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=int(epoch))
            self._last[trial] = int(epoch)
            self._final[trial] = result
        except Exception as exc:  # noqa: BLE001
            self._fail("logging metrics", exc)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if self._off or trial not in self._trial_runs:
            return
        try:
            import mlflow

            run_id = self._trial_runs[trial]
            last = self._final.get(trial, {})
            genotype = last.get("genotype")
            if genotype is None and last.get("genotype_id") is not None:
                entry = self._genotypes.get(str(trial.config.get("genotype", "")))
                genotype = entry.get("genotype") if entry else None
            if genotype is not None:
                mlflow.MlflowClient(self.tracking_uri).log_dict(run_id, genotype, "genotype.json")
            self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")
        except Exception as exc:  # noqa: BLE001
            self._fail("ending a run", exc)


REPORTED = ("stage", "op_set", "genotype_id", "F")  # logged from the trial's first report, not its config


def _params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters, flat: its grid point (genotype, layers, seed) and the stage's training
    settings (``base``), each a short string or number; the op set and F as the trial reports them
    (``REPORTED``: the config's F may be folded into an id, an op set's default F unnamed)."""
    flat = {**config, **config.get("point", {})}
    params = {k: v for k, v in flat.items() if k not in ("base", "point", *REPORTED)
              and not isinstance(v, (dict, list))}
    for key, value in (flat.get("base") or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            params[key] = value
    return params
