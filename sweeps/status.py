"""One line per trial: stage, state, epoch reached, latest metrics, error summary (read offline)."""

from __future__ import annotations

import math
from pathlib import Path

from nas.errors import ConfigError
from sweeps.lock import describe, holder_alive, read_lock


def failed_trials(location: str) -> list[str]:
    """One line per errored or diverged trial of a sweep, local or in cloud storage (as ``status`` writes
    them)."""
    lines = sweep_status(location).splitlines()[1:-1]
    return [ln for ln in lines if not ln.startswith("cost:") and ln.split()[2:3] in (["errored"], ["diverged"])]


def sweep_status(path: str | Path, as_json: bool = False) -> str:
    """The status of a sweep folder, local or in cloud storage (``s3://...``: read through a local copy of
    everything but the weights)."""
    import tempfile

    from sweeps.driver import SweepDir

    sweep = SweepDir.at(path)
    if not sweep.is_sweep():
        raise ConfigError(f"{path} is not a sweep directory (no sweep.yaml); pass the folder `sweep run` printed")
    if sweep.is_local:
        return _status(sweep, as_json)
    with tempfile.TemporaryDirectory(prefix="dartsweep-status-") as tmp:
        return _status(SweepDir.at(sweep.mirror(tmp)), as_json, lock_of=sweep)


def _status(sweep, as_json: bool, lock_of=None) -> str:
    from analysis.frames import trials_frame

    frame = trials_frame(sweep.path)
    if as_json:
        return frame.to_json(orient="records")
    stages = sweep.read_state().get("stages", {})
    lines = [f"sweep {sweep.path.name}: " + ", ".join(f"{s} {stages.get(s, 'not started')}" for s in ("search", "eval"))]
    holder = read_lock(lock_of or sweep)
    if holder is not None:
        lines[0] += f"; {'run by' if holder_alive(holder) else 'left locked by a driver that is gone:'} {describe(holder)}"
    for _, r in frame.iterrows():
        what = (f"{r.op_set}" + (f" F={r.F:g}" if not math.isnan(r.F) else "") if r.stage == "search"
                else f"{r.cell} L={int(r.layers)}")
        acc = "valid" if r.stage == "search" else "test"
        metric = f"{acc}_acc {r.final_acc:.2f} (best {r.best_acc:.2f})" if not math.isnan(r.final_acc) else "no results"
        extra = f"  {r.params_m:.3g}M params {r.gmac:.3g} GMAC" if r.stage == "eval" and not math.isnan(r.gmac) else ""
        err = f"  error: {r.error}" if r.error else ""
        lines.append(f"{r.stage:<6} {r.trial_id:<12} {r.status:<10} epoch {r.epochs_done}/{r.epochs_total}  {what}"
                     f" seed={int(r.seed) if not math.isnan(r.seed) else '?'}  {metric}{extra}{err}")
    counts = frame.status.value_counts().to_dict() if len(frame) else {}
    lines += _cost_lines(sweep, frame)
    lines.append("trials: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "none yet"))  # stays last
    return "\n".join(lines)


def _cost_lines(sweep, frame) -> list[str]:
    """Device-hours spent and left (``sweeps.estimate.cost_so_far``); nothing where the sweep file cannot
    be read (status still shows the trials)."""
    from sweeps.driver import eval_genotypes, expected_trials, read_searched
    from sweeps.estimate import cost_so_far

    try:
        spec = sweep.load_spec(plugins="optional")
        expected = {}
        if spec.search is not None:
            expected["search"] = expected_trials(spec.search)
        if spec.eval is not None:
            expected["eval"] = expected_trials(spec.eval, eval_genotypes(spec, read_searched(sweep.path)))
    except (ConfigError, OSError, ValueError, KeyError):
        return []
    return [f"cost: {line}" for line in cost_so_far(spec, frame, expected)] if len(frame) else []
