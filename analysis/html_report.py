"""``dartsweep report``: one self-contained HTML page of a sweep (or several merged), for a browser.

Built from the same frames as ``analyze`` (:func:`analysis.report.load_sweeps`): the sweep at a glance
(stages, trials by state with each error's first line, device-hours spent and left), interactive
accuracy-vs-GMAC/params/latency/layers plots with the Pareto fronts on network means (hover: the network,
its seeds' mean ± std and its cell diagrams; a legend click hides a genotype), Table 1 beside the paper,
the search curves and alpha evolution, searches that stopped early, and a sortable, filterable table of
every trial. Plotly draws the plots; its JavaScript is inlined once, so the page opens from a laptop's
disk or a cluster share with no network. A running sweep shows what has finished so far.
"""

from __future__ import annotations

import html
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import plots
from analysis.frames import eval_stage_table
from analysis.paper import SOURCE, beside_paper
from analysis.pareto import network_means, pareto_set
from analysis.report import _genotype, load_sweeps, search_stops, table1
from nas.io import write_text_atomic

# x axes of the accuracy plots: frame column, axis title, whether a Pareto front is drawn (lower is better)
AXES = {"gmac": ("GMAC", True), "params_m": ("parameters (M)", True), "latency_ms": ("latency (ms, batch 1)", True),
        "layers": ("evaluation layers", False)}
TRIAL_COLUMNS = ["sweep", "stage", "trial_id", "status", "op_set", "F", "cell", "layers", "seed", "epochs_done",
                 "epochs_total", "final_acc", "best_acc", "params_m", "gmac", "latency_ms", "error"]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(frame: pd.DataFrame, table_id: str | None = None, sortable: bool = False) -> str:
    if frame.empty:
        return "<p class='empty'>(none)</p>"
    attrs = f" id='{table_id}'" if table_id else ""
    attrs += " class='sortable'" if sortable else ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = row[c]
            text = _num(v) if isinstance(v, float) else ("" if v is None or v is pd.NA else str(v))
            sort = f" data-sort='{v}'" if _finite(v) else ""
            cells.append(f"<td{sort}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _overview(dirs: list[Path], trials: pd.DataFrame) -> str:
    from sweeps.driver import SweepDir
    from sweeps.status import _cost_lines

    parts = []
    for d in dirs:
        name = d.name if len(dirs) == 1 else str(d)
        mine = trials[trials.sweep_dir == str(d)]
        state = {}
        if (d / "state.json").is_file():
            state = json.loads((d / "state.json").read_text()).get("stages", {})
        stages = ", ".join(f"{s}: {state.get(s, 'not started')}" for s in ("search", "eval"))
        lines = [f"<h3>{html.escape(name)}</h3>", f"<p>stages: {html.escape(stages)}</p>"]
        for stage in ("search", "eval"):
            sub = mine[mine.stage == stage]
            if len(sub):
                counts = ", ".join(f"{v} {k}" for k, v in sub.status.value_counts().items())
                lines.append(f"<p>{stage}: {len(sub)} trials ({html.escape(counts)})</p>")
        failed = mine[mine.status.isin(["errored", "diverged"])]
        if len(failed):
            items = "".join(f"<li><code>{html.escape(str(r.trial_id))}</code> {html.escape(str(r.status))}: "
                            f"{html.escape(str(r.error or '').splitlines()[0] if r.error else '')}</li>"
                            for r in failed.itertuples())
            lines.append(f"<ul class='errors'>{items}</ul>")
        try:
            cost = _cost_lines(SweepDir.at(d), mine.drop(columns=["sweep_dir", "sweep"], errors="ignore"))
        except Exception:  # noqa: BLE001 - the cost estimate is a nicety; the page still shows the trials
            cost = []
        lines += [f"<p class='cost'>{html.escape(line)}</p>" for line in cost]
        if mine.empty:
            lines.append("<p class='empty'>No trial has reported yet.</p>")
        parts.append("".join(lines))
    return "".join(parts)


def _cell_svgs(dirs: list[Path], trials: pd.DataFrame) -> dict[str, str]:
    """genotype id -> the normal and reduce cells as inline SVG (the diagrams ``analyze`` draws)."""
    evals = trials[trials.stage == "eval"].dropna(subset=["genotype_id"])
    svgs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="dartsweep-report-") as tmp:
        for d in dirs:
            table = eval_stage_table(d)
            mine = evals[evals.sweep_dir == str(d)]
            for gid in sorted(set(mine.genotype_id) - set(svgs)):
                geno = _genotype(d, gid, mine, table)
                if geno is None:
                    continue
                drawn = []
                for cell in ("normal", "reduce"):
                    paths = [p for p in plots.draw_cell(geno, cell, Path(tmp, gid)) if p.suffix == ".svg"]
                    if paths:
                        text = paths[0].read_text()
                        drawn.append(text[text.find("<svg"):])
                svgs[gid] = "".join(f"<div class='cell'>{s}</div>" for s in drawn)
    return svgs


def _accuracy_figures(trials: pd.DataFrame) -> tuple[list[tuple[str, Any]], int]:
    """(name, plotly figure) per x axis, and how many networks they plot (network means with a finite
    accuracy; a diverged trial's NaN accuracy is never drawn as a number)."""
    import plotly.graph_objects as go

    means = network_means(trials)
    means = means[means.final_acc.map(_finite)] if len(means) else means
    figures = []
    for column, (title, front) in AXES.items():
        if column not in means or not means[column].map(_finite).any():
            continue
        data = means[means[column].map(_finite)]
        fig = go.Figure()
        for cell, group in data.groupby("cell", sort=True):
            group = group.sort_values(column)
            custom = [[r.genotype_id, str(r.cell), _num(getattr(r, "op_set", None)), int(r.layers),
                       f"{r.final_acc:.2f}", f" ± {r.acc_std:.2f}" if _finite(r.acc_std) else "", int(r.seeds), r.trial_ids,
                       _num(r.gmac), _num(r.params_m), _num(getattr(r, "sweep", ""))] for r in group.itertuples()]
            fig.add_trace(go.Scatter(
                x=group[column].tolist(), y=group.final_acc.tolist(), name=str(cell), legendgroup=str(cell),
                mode="lines+markers" if column == "layers" else "markers", marker=dict(size=10),
                error_y=dict(type="data", array=group.acc_std.fillna(0).tolist(), visible=True, thickness=1),
                customdata=custom, meta="network",
                hovertemplate=("<b>%{customdata[1]}</b><br>genotype %{customdata[0]}<br>layers %{customdata[3]}"
                               "<br>test acc %{customdata[4]}%{customdata[5]} % (%{customdata[6]} seed(s))"
                               "<br>%{customdata[8]} GMAC, %{customdata[9]} M params<br>trials "
                               "%{customdata[7]}<extra></extra>")))
        if front:
            pareto = pareto_set(trials, column)
            pareto = pareto[pareto.final_acc.map(_finite)]
            fig.add_trace(go.Scatter(x=pareto[column].tolist(), y=pareto.final_acc.tolist(), name="Pareto front",
                                     mode="lines",
                                     line=dict(color="black", dash="dot", shape="hv"), meta="front",
                                     hoverinfo="skip"))
        fig.update_layout(title=f"Test accuracy vs {title}", xaxis_title=title, yaxis_title="test accuracy (%)",
                          template="plotly_white", height=430, margin=dict(l=60, r=20, t=50, b=50),
                          legend=dict(title="genotype (click to hide)"), xaxis_exponentformat="e")
        figures.append((column, fig))
    return figures, len(means)


def _search_figures(trials: pd.DataFrame, history: pd.DataFrame) -> list[tuple[str, Any]]:
    import plotly.graph_objects as go

    search = trials[trials.stage == "search"]
    if search.empty or history.empty or "valid_acc" not in history:
        return []
    fig = go.Figure()
    names = search.set_index("trial_id").op_set.to_dict()
    rows = history[history.stage == "search"]
    for trial_id, group in rows.groupby("trial_id"):
        group = group.sort_values("epoch")
        fig.add_trace(go.Scatter(x=group.epoch.tolist(), y=group.valid_acc.tolist(), mode="lines+markers",
                                 name=f"{names.get(trial_id, '')} ({trial_id})"))
    fig.update_layout(title="Search: validation accuracy", xaxis_title="search epoch",
                      yaxis_title="validation accuracy (%)", template="plotly_white", height=380)
    figures = [("search_accuracy", fig)]
    done = search.dropna(subset=["best_acc"])
    if len(done):
        best = done.sort_values("best_acc", ascending=False).iloc[0]
        epochs = plots.read_search_history(best.trial_dir)
        if epochs:
            alpha = go.Figure()
            for i, op in enumerate(epochs[-1]["primitives"]):
                alpha.add_trace(go.Scatter(x=[h["epoch"] for h in epochs],
                                           y=[h["alpha_normal"][0][i] for h in epochs], mode="lines", name=op))
            alpha.update_layout(title=f"softmax(alpha), normal cell, edge 0 ({best.trial_id}, the best search)",
                                xaxis_title="search epoch", yaxis_title="softmax(alpha)", template="plotly_white",
                                height=380)
            figures.append(("alpha", alpha))
    return figures


def _trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in TRIAL_COLUMNS if c in trials.columns]
    frame = trials[cols].copy()
    if "error" in frame:
        frame["error"] = frame.error.fillna("").map(lambda e: str(e).splitlines()[0] if e else "")
    if "sweep" in frame and frame.sweep.nunique() < 2:
        frame = frame.drop(columns="sweep")
    return frame


def build_report(sweep_dirs: list[str | Path], out: str | Path, title: str | None = None) -> tuple[Path, dict]:
    """Write the page to ``out``; returns (path, what it holds: plots and the networks each draws)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    dirs = [Path(d) for d in sweep_dirs]
    trials, history = load_sweeps(dirs)
    title = title or ", ".join(d.name for d in dirs)
    accuracy, networks = _accuracy_figures(trials)
    figures = accuracy + _search_figures(trials, history)
    divs = {name: pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"plot-{name}",
                              config={"displaylogo": False, "responsive": True})
            for name, fig in figures}
    svgs = _cell_svgs(dirs, trials)
    t1 = table1(trials)
    paper = beside_paper(network_means(trials))
    stops = search_stops(trials)
    sections = [f"<section id='overview'><h2>The sweep at a glance</h2>{_overview(dirs, trials)}</section>"]
    if accuracy:
        plots_html = "".join(f"<div class='plot'>{divs[name]}</div>" for name, _ in accuracy)
        sections.append("<section id='networks'><h2>Accuracy vs cost and depth</h2><p>One point per network "
                        "(genotype and layers): the mean over its seeds, the bar one standard deviation; fronts "
                        "on these means. Hover a point for its cells.</p><div class='split'><div class='plots'>"
                        f"{plots_html}</div><aside id='cell-panel'><p>Hover a point to see its cells.</p>"
                        "</aside></div></section>")
    elif (trials.stage == "eval").any():
        sections.append("<section id='networks'><h2>Accuracy vs cost and depth</h2><p class='empty'>No eval "
                        "trial has finished with a finite accuracy yet.</p></section>")
    sections.append(f"<section id='table1'><h2>Table 1 (mean over seeds)</h2>{_table(t1)}"
                    f"<h3>Beside the paper</h3>{_table(paper)}<p class='note'>Paper figures: "
                    f"{html.escape(SOURCE)}.</p></section>")
    search_plots = [name for name, _ in figures if name in ("search_accuracy", "alpha")]
    if search_plots or len(stops):
        inner = "".join(f"<div class='plot'>{divs[n]}</div>" for n in search_plots)
        if len(stops):
            inner += f"<h3>Searches that stopped early</h3>{_table(stops)}"
        sections.append(f"<section id='search'><h2>Search</h2>{inner}</section>")
    sections.append("<section id='trials'><h2>Every trial</h2><input id='trial-filter' type='search' "
                    "placeholder='filter rows (any text)'> <span id='trial-count'></span>"
                    f"{_table(_trials_table(trials), 'trial-table', sortable=True)}</section>")
    page = PAGE.format(title=html.escape(title), plotly=get_plotlyjs(), body="".join(sections),
                       cells=json.dumps(svgs).replace("</", "<\\/"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    return out, {"plots": [name for name, _ in figures], "networks": networks, "bytes": len(page.encode()),
                 "trials": len(trials)}


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dartsweep: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; font-size: .85em; margin: .5em 0; }}
th, td {{ border: 1px solid #ddd; padding: .25em .5em; text-align: left; }}
th {{ background: #f4f4f4; }} table.sortable th {{ cursor: pointer; user-select: none; }}
.split {{ display: grid; grid-template-columns: minmax(0, 1fr) 380px; gap: 1em; align-items: start; }}
#cell-panel {{ position: sticky; top: 1em; border: 1px solid #ddd; padding: .5em;
  max-height: 90vh; overflow: auto; font-size: .85em; }}
#cell-panel svg {{ width: 100%; height: auto; }} .errors {{ color: #a00; }} .empty, .note {{ color: #666; }}
</style>
<script>{plotly}</script>
</head><body>
<h1>dartsweep: {title}</h1>
{body}
<script>
const CELLS = {cells};
function showCells(point) {{
  const d = point.customdata; if (!d) return;
  const panel = document.getElementById('cell-panel');
  panel.innerHTML = '<p><b>' + d[1] + '</b> at ' + d[3] + ' layers: ' + d[4] + d[5] + ' % (' + d[6]
    + ' seed(s))<br>genotype ' + d[0] + '</p>' + (CELLS[d[0]] || '<p>(no cell diagram)</p>');
}}
document.querySelectorAll('.plots .js-plotly-plot').forEach(gd => {{
  gd.on('plotly_hover', ev => showCells(ev.points[0]));
}});
const table = document.getElementById('trial-table');
function count() {{
  const rows = [...table.tBodies[0].rows];
  document.getElementById('trial-count').textContent =
    rows.filter(r => r.style.display !== 'none').length + ' of ' + rows.length + ' trials';
}}
if (table) {{
  document.getElementById('trial-filter').addEventListener('input', ev => {{
    const q = ev.target.value.toLowerCase();
    [...table.tBodies[0].rows].forEach(r => {{ r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none'; }});
    count();
  }});
  [...table.tHead.rows[0].cells].forEach((th, i) => th.addEventListener('click', () => {{
    const up = th.dataset.dir !== 'up'; th.dataset.dir = up ? 'up' : 'down';
    const key = r => {{ const c = r.cells[i]; return c.dataset.sort !== undefined ? parseFloat(c.dataset.sort) : c.textContent; }};
    const rows = [...table.tBodies[0].rows].sort((a, b) => {{
      const x = key(a), y = key(b);
      const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return up ? c : -c;
    }});
    rows.forEach(r => table.tBodies[0].appendChild(r));
  }}));
  count();
}}
</script>
</body></html>
"""
