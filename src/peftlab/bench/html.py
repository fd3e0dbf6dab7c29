"""The bench results page: one self-contained HTML file from a suite's result records.

    write_html(suite, results_dir) -> path of report.html

The page says what report.md says (its text and tables are the Markdown report's, turned into
HTML), with one tab per task and a Pareto plot per task whose x axis the reader switches between
trainable parameters, peak memory and training time. Everything is inline: the CSS, a few lines
of hand-written JavaScript for the tabs and the switch, and the plots as SVG drawn here, so the
page opens from a file with no server and no network. `#task=NAME&axis=rss` in the address picks
the tab and the axis it opens with. Without JavaScript every tab and plot is shown, one below the
other.
"""
from __future__ import annotations

import math
import pathlib
import re
from html import escape
from typing import Any

import yaml

from ..io import files
from .report import BASELINES, aggregate, label_heights, markdown, pareto_front, score_metric
from .runner import read_invocations, read_records
from .suite import Suite

PAGE = "report.html"

# (aggregate()'s key, the switch's button, the x axis label, always a log scale)
AXES = (("trainable", "trainable parameters", "trainable parameters", True),
        ("rss", "peak memory", "peak memory of the run (RSS, MB)", False),
        ("train_cpu", "training time", "training time (CPU seconds of the training loop)", False))

# The SVG canvas (pixels): the plot area sits inside these margins; the right one leaves room for
# the labels of the rightmost points.
WIDTH, HEIGHT = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 130, 14, 50
COLORS = {"method": "#1f77b4", "baseline": "#d62728", "peer": "#7f7f7f", "front": "#2ca02c"}


# ---- the Markdown report, as HTML --------------------------------------------------------------


def _inline(text: str) -> str:
    """Escapes one line of Markdown and renders its **bold** and `code` spans."""
    text = escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


NUMBER = re.compile(r"^[-+]?(\d|\.\d|-$|—)")  # numbers (and '-' or '—', no value) are right-aligned


def _cells(row: str) -> list[str]:
    """'| a | b \\| c |' -> ['a', 'b | c'] (a pipe escaped with a backslash stays in its cell)."""
    inner = row.strip()[1:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _table(rows: list[str]) -> str:
    header, body = _cells(rows[0]), [_cells(row) for row in rows[2:]]  # rows[1] is |---|---|
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in header)
    lines = ["".join(f'<td class="num">{_inline(cell)}</td>' if NUMBER.match(cell) else f"<td>{_inline(cell)}</td>"
                     for cell in cells) for cells in body]
    rows_html = "\n".join(f"<tr>{line}</tr>" for line in lines)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows_html}\n</tbody></table></div>'


def blocks_to_html(lines: list[str]) -> str:
    """The Markdown the report writes (### headings, paragraphs of one line, tables, '- ' lists)
    as HTML. Image lines are left out: the page draws its own plots."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            out.append(_table(lines[i:end]))
            i = end
            continue
        if line.startswith("- "):
            end = i
            while end < len(lines) and lines[end].startswith("- "):
                end += 1
            out.append("<ul>" + "".join(f"<li>{_inline(item[2:])}</li>" for item in lines[i:end]) + "</ul>")
            i = end
            continue
        if line.startswith("### "):
            out.append(f"<h3>{_inline(line[4:])}</h3>")
        elif line.strip() and not line.startswith("!["):
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def sections(text: str) -> tuple[str, list[str], list[tuple[str, list[str]]]]:
    """report.md -> (its title, the lines before the first section, [(section title, its lines)])."""
    lines = text.splitlines()
    title = lines[0].removeprefix("# ")
    intro: list[str] = []
    parts: list[tuple[str, list[str]]] = []
    for line in lines[1:]:
        if line.startswith("## "):
            parts.append((line[3:], []))
        elif parts:
            parts[-1][1].append(line)
        else:
            intro.append(line)
    return title, intro, parts


# ---- the plots ---------------------------------------------------------------------------------


class Scale:
    """Data values -> pixels along one axis, linear or log10, with 5% room at both ends."""

    def __init__(self, values: list[float], pixels: tuple[float, float], log: bool):
        self.log = log
        ends = [math.log10(v) for v in (min(values), max(values))] if log else [min(values), max(values)]
        span = ends[1] - ends[0]
        pad = 0.05 * span if span > 0 else (0.5 if log else max(abs(ends[0]) * 0.1, 1e-3))
        self.low, self.high = ends[0] - pad, ends[1] + pad
        self.pixels = pixels

    def fraction(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return (v - self.low) / (self.high - self.low)

    def __call__(self, value: float) -> float:
        start, end = self.pixels
        return start + self.fraction(value) * (end - start)

    def ticks(self) -> list[float]:
        """Decades (and 2x, 5x within less than 2.5 of them) on a log scale; 1, 2 or 5 times a power
        of ten apart on a linear one, or on a log scale too narrow for two of its own ticks."""
        if self.log:
            steps = (1, 2, 5) if self.high - self.low < 2.5 else (1,)
            candidates = [m * 10.0 ** d for d in range(math.floor(self.low), math.ceil(self.high) + 1) for m in steps]
            ticks = [t for t in candidates if self.low <= math.log10(t) <= self.high]
            if len(ticks) >= 2:
                return ticks
        low, high = (10.0 ** self.low, 10.0 ** self.high) if self.log else (self.low, self.high)
        step = _nice_step((high - low) / 6)
        return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _nice_step(rough: float) -> float:
    power = 10.0 ** math.floor(math.log10(rough))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= rough)


def _tick_text(value: float, step: float | None = None) -> str:
    """1500 -> 1500, 20000 -> 20k, 2000000 -> 2M; with a step, as many decimals as the step needs."""
    if step is not None and abs(step) < 1:
        return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= 10 * size or (unit == "M" and abs(value) >= size):
            return f"{value / size:g}{unit}"
    return f"{value:.4g}"


def plot_points(table: dict, task: str, quantity: str) -> tuple[list[tuple[float, float, float | None, str]],
                                                                  list[tuple[float, float, str]]]:
    """([(x, mean score, std or None, method)] of peftlab's rows, [(x, score, method)] of the peft peers)
    for one task and x quantity; rows without a score or a positive x are left out."""
    def usable(v: dict) -> bool:
        return bool(v["score"] and v[quantity] and v[quantity][0] > 0)

    ours = [(v[quantity][0], v["score"][0], v["score"][1], m) for (t, m, impl), v in sorted(table.items())
            if t == task and impl == "peftlab" and usable(v)]
    peers = [(v[quantity][0], v["score"][0], m) for (t, m, impl), v in sorted(table.items())
             if t == task and impl == "peft" and usable(v)]
    return ours, peers


def _axes_svg(x: Scale, y: Scale, xlabel: str, ylabel: str) -> list[str]:
    """The frame, the grid lines with their tick labels, and the two axis labels."""
    (x0, x1), (y0, y1) = x.pixels, y.pixels  # y0 is the bottom: pixel y grows downwards
    out = [f'<rect class="frame" x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}"/>']
    for tick in x.ticks():
        px = x(tick)
        out.append(f'<line class="grid" x1="{px:.1f}" y1="{y1}" x2="{px:.1f}" y2="{y0}"/>'
                   f'<text class="tick" x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{_tick_text(tick)}</text>')
    y_ticks = y.ticks()
    step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
    for tick in y_ticks:
        py = y(tick)
        out.append(f'<line class="grid" x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{py + 4:.1f}" text-anchor="end">{_tick_text(tick, step)}</text>')
    out.append(f'<text class="label" x="{(x0 + x1) / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text class="label" transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    return out


def _front_svg(front: list[tuple[float, float, str]], x: Scale, y: Scale) -> str:
    """The Pareto front as a staircase: each point's score holds until the next point's x."""
    path = f"M{x(front[0][0]):.1f},{y(front[0][1]):.1f}"
    for px, py, _ in front[1:]:
        path += f" H{x(px):.1f} V{y(py):.1f}"
    names = escape(" ".join(label for _, _, label in front))
    return f'<path class="front" data-methods="{names}" d="{path}"/>'


def _points_svg(ours: list, peers: list, x: Scale, y: Scale, describe) -> list[str]:
    """Error bars (+- one std over the seeds), the points with a tooltip, and the peers' rings."""
    out = []
    for vx, vy, std, name in ours:
        if std:
            out.append(f'<line class="bar" x1="{x(vx):.1f}" y1="{y(vy - std):.1f}" x2="{x(vx):.1f}" '
                       f'y2="{y(vy + std):.1f}"/>')
    for vx, vy, name in peers:
        out.append(f'<circle class="peer" cx="{x(vx):.1f}" cy="{y(vy):.1f}" r="6" data-method="{escape(name)}">'
                   f'<title>{escape(name)} (peft): {describe(vx, vy, None)}</title></circle>')
    for vx, vy, std, name in ours:
        kind = "baseline" if name in BASELINES else "method"
        out.append(f'<circle class="{kind}" cx="{x(vx):.1f}" cy="{y(vy):.1f}" r="4" data-method="{escape(name)}" '
                   f'data-x="{vx:g}" data-y="{vy:g}"><title>{escape(name)}: {describe(vx, vy, std)}</title></circle>')
    return out


def _labels_svg(ours: list, x: Scale, y: Scale) -> list[str]:
    """Each point's name to its right; names of points close on x are spread apart vertically
    (the PNG plots' rule, report.label_heights) and joined to their point by a thin line."""
    (y_bottom, y_top), height = y.pixels, y.pixels[0] - y.pixels[1]
    fractions = [(x.fraction(vx), y.fraction(vy)) for vx, vy, _, _ in ours]
    # a row of 10-pixel text is ~12 pixels; labels are ~70 pixels wide
    rows = label_heights(fractions, gap=12 / height, width=70 / (x.pixels[1] - x.pixels[0]))
    out = []
    for (vx, vy, _, name), row in zip(ours, rows):
        px, py, ly = x(vx), y(vy), y_bottom - row * height
        if abs(ly - py) > 3:
            out.append(f'<line class="leader" x1="{px:.1f}" y1="{py:.1f}" x2="{px + 7:.1f}" y2="{ly:.1f}"/>')
        out.append(f'<text class="name" x="{px + 8:.1f}" y="{ly + 3.5:.1f}">{escape(name)}</text>')
    return out


def plot_svg(table: dict, task: str, axis: tuple[str, str, str, bool], metric: str, mode: str) -> str:
    """One task's Pareto plot against one axis, as an <svg> element (no script, no external file)."""
    quantity, _, xlabel, always_log = axis
    ours, peers = plot_points(table, task, quantity)
    if not ours:
        return f'<p class="empty">No finished run of {escape(task)} records its {escape(xlabel)}.</p>'
    xs = [p[0] for p in ours + peers]
    log = always_log or max(xs) > 10 * min(xs)
    ys = [v for vx, vy, std, _ in ours for v in (vy - (std or 0), vy + (std or 0))] + [p[1] for p in peers]
    x = Scale(xs, (LEFT, WIDTH - RIGHT), log)
    y = Scale(ys, (HEIGHT - BOTTOM, TOP), False)

    def describe(vx: float, vy: float, std: float | None) -> str:
        score = f"{vy:.3f}" + (f" ± {std:.3f}" if std else "")
        return f"{metric} {score}, {xlabel} {_tick_text(vx)}"

    better = "higher" if mode == "max" else "lower"
    front = pareto_front([(vx, vy, name) for vx, vy, _, name in ours], mode)
    body = _axes_svg(x, y, xlabel + (" (log scale)" if log else ""), f"{metric} ({better} is better)")
    if len(front) > 1:
        body.append(_front_svg(front, x, y))
    body += _points_svg(ours, peers, x, y, describe) + _labels_svg(ours, x, y)
    title = escape(f"{task}: {metric} against {xlabel}")
    return (f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
            f'aria-label="{title}" xmlns="http://www.w3.org/2000/svg">\n' + "\n".join(body) + "\n</svg>")


# ---- the page ----------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0 auto;
       max-width: 1280px; padding: 0 24px 48px; }
h1 { font-size: 24px; margin: 20px 0 8px; } h2 { font-size: 19px; margin: 28px 0 8px; }
h3 { font-size: 16px; } code { font: 12.5px ui-monospace, monospace; background: #f3f3f3; padding: 0 3px; }
.controls { display: flex; flex-wrap: wrap; gap: 18px; align-items: center; margin: 18px 0 10px; }
.controls span { color: #555; margin-right: 4px; }
button { font: inherit; border: 1px solid #bbb; background: #f7f7f7; padding: 4px 12px; cursor: pointer; }
button[aria-selected="true"], button[aria-pressed="true"] { background: #34495e; color: #fff; border-color: #34495e; }
.tabs button { border-radius: 6px 6px 0 0; } .axes button { border-radius: 14px; }
.panel { border-top: 2px solid #34495e; padding-top: 6px; }
.scroll { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; } td.num { text-align: right; }
thead th { background: #f0f4f8; position: sticky; top: 0; } tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 8px 0; } figcaption { color: #555; font-size: 13px; max-width: 760px; }
svg.plot { max-width: 100%; height: auto; font-family: system-ui, sans-serif; }
.frame { fill: none; stroke: #888; } .grid { stroke: #e5e5e5; } .tick { font-size: 11px; fill: #444; }
.label { font-size: 12px; fill: #222; } .name { font-size: 10px; fill: #333; }
.leader { stroke: #999; stroke-width: 0.6; } .bar { stroke: #999; stroke-width: 1; }
.method { fill: #1f77b4; } .baseline { fill: #d62728; } .peer { fill: none; stroke: #7f7f7f; stroke-width: 1.2; }
.front { fill: none; stroke: #2ca02c; stroke-width: 1.6; }
.key { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin: 0 3px 0 10px; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12.5px; }
"""

# The tabs and the axis switch: show one task's panel and one axis's plots, and keep the choice
# in the address (#task=...&axis=...) so a link opens the same view.
SCRIPT = """
(function () {
  var taskButtons = Array.from(document.querySelectorAll("button[data-task]"));
  var axisButtons = Array.from(document.querySelectorAll("button[data-axis]"));
  if (!taskButtons.length || !axisButtons.length) { return; }
  var asked = new URLSearchParams(location.hash.slice(1));
  var pick = function (buttons, key, wanted) {
    var found = buttons.filter(function (b) { return b.dataset[key] === wanted; });
    return (found.length ? found[0] : buttons[0]).dataset[key];
  };
  var task = pick(taskButtons, "task", asked.get("task"));
  var axis = pick(axisButtons, "axis", asked.get("axis"));
  function show() {
    document.querySelectorAll("[data-task-panel]").forEach(function (p) { p.hidden = p.dataset.taskPanel !== task; });
    document.querySelectorAll("[data-axis-plot]").forEach(function (p) { p.hidden = p.dataset.axisPlot !== axis; });
    taskButtons.forEach(function (b) { b.setAttribute("aria-selected", String(b.dataset.task === task)); });
    axisButtons.forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.axis === axis)); });
    document.body.dataset.task = task;
    document.body.dataset.axis = axis;
    history.replaceState(null, "", "#task=" + encodeURIComponent(task) + "&axis=" + encodeURIComponent(axis));
  }
  taskButtons.forEach(function (b) { b.addEventListener("click", function () { task = b.dataset.task; show(); }); });
  axisButtons.forEach(function (b) { b.addEventListener("click", function () { axis = b.dataset.axis; show(); }); });
  show();
})();
"""

CAPTION = ("Each point is a method's mean over the seeds (bars: ± one standard deviation); "
           '<span class="key" style="background:#1f77b4"></span>methods '
           '<span class="key" style="background:#d62728"></span>baselines '
           '<span class="key" style="border:1.2px solid #7f7f7f"></span>the same method through <code>peft</code>; '
           "the green staircase is the Pareto front: no other method is both better and smaller on this axis. "
           "Point at a dot for its numbers.")


def _task_panel(task: str, lines: list[str], table: dict, metric: str, mode: str) -> str:
    plots = "\n".join(f'<div data-axis-plot="{axis[0]}">{plot_svg(table, task, axis, metric, mode)}</div>'
                      for axis in AXES)
    return (f'<section class="panel" data-task-panel="{escape(task)}">\n<h2>{escape(task)}</h2>\n'
            f"<figure>\n{plots}\n<figcaption>{CAPTION}</figcaption>\n</figure>\n{blocks_to_html(lines)}\n</section>")


def _controls(tasks: list[str]) -> str:
    tabs = "".join(f'<button type="button" role="tab" data-task="{escape(t)}">{escape(t)}</button>' for t in tasks)
    axes = "".join(f'<button type="button" data-axis="{quantity}">{button}</button>' for quantity, button, _, _ in AXES)
    return (f'<div class="controls"><div class="tabs" role="tablist"><span>task</span>{tabs}</div>'
            f'<div class="axes"><span>score against</span>{axes}</div></div>')


def _run_config(suite: Suite) -> str:
    """The suite's model, data and training settings, as its YAML says them."""
    shown = {"run": suite.run, "tasks": suite.tasks, "seeds": suite.seeds, "select": suite.select,
             "method_fields": suite.method_fields}
    text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=100)
    return f"<h3>Run settings (from the suite file)</h3>\n<pre>{escape(text)}</pre>"


def page(suite: Suite, records: list[dict[str, Any]], invocations: list[dict[str, Any]] = ()) -> str:
    """The whole page as one string: report.md's text and tables, a tab per task with its plots."""
    metric, mode = score_metric(suite)
    table = aggregate(records, suite)
    title, intro, parts = sections(markdown(suite, records, [], invocations))
    tasks = [name for name, _ in parts if name in suite.tasks]
    body = [f"<h1>{_inline(title)}</h1>", blocks_to_html(intro)]
    if tasks:
        body.append(_controls(tasks))
        body += [_task_panel(name, lines, table, metric, mode) for name, lines in parts if name in tasks]
    for name, lines in parts:
        if name not in tasks:
            extra = _run_config(suite) if name == "Setup" else ""
            body.append(f"<section>\n<h2>{_inline(name)}</h2>\n{blocks_to_html(lines)}\n{extra}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{_inline(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body>\n</html>\n")


def write_html(suite: Suite, results_dir: pathlib.Path) -> pathlib.Path:
    """Writes results_dir/report.html from the records there; returns its path."""
    path = results_dir / PAGE
    files.write_text(path, page(suite, read_records(results_dir), read_invocations(results_dir)))
    return path
