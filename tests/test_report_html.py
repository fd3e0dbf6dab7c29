"""`peftlab bench report SUITE --html`: the self-contained results page.

A few hand-made records (two tasks, two seeds, a baseline, three methods and a `peft` peer) go
through the page builder; the page is checked as HTML (its tables are report.md's, one tab and
three plots per task, the right points on each Pareto front, nothing loaded from outside) and
then opened in headless Chromium (the Debian `chromium` package; `make setup` installs it):
the script must run without a console message, pick the tab and axis the address asks for, and
the screenshot (saved to the test's tmp_path) must show the plot's points.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from peftlab.bench import html as page_html, report, runner, suite as suites
from peftlab.bench import run_from_args, add_arguments

TASKS = ("movie-sentiment", "sms-spam")
# method -> (trainable parameters, peak RSS MB, training CPU seconds, test accuracy at seed 0)
ROWS = {
    "head-only": (1_000, 500.0, 10.0, 0.60),
    "lora": (10_000, 900.0, 20.0, 0.80),
    "vera": (2_000, 1_000.0, 40.0, 0.70),  # small but slow and heavy: on the parameter front only
    "dora": (100_000, 600.0, 15.0, 0.85),  # big but light and quick: on the memory and time fronts
}


def record(task: str, method: str, seed: int, implementation: str = "peftlab") -> dict:
    trainable, rss, cpu, score = ROWS[method]
    score += 0.02 * seed - (0.1 if task == "sms-spam" else 0.0) - (0.01 if implementation == "peft" else 0.0)
    suffix = "--peft" if implementation == "peft" else ""
    return {"schema": runner.SCHEMA, "run": f"{method}--{task}--s{seed}{suffix}", "status": "ok", "phase": "final",
            "task": task, "method": method, "implementation": implementation, "seed": seed, "lr": 1e-3,
            "metrics": {"test": {"accuracy": score}}, "trainable_parameters": trainable,
            "trainable_share": trainable / 1e6, "train_time_s": cpu, "train_cpu_time_s": cpu, "s_per_step": 0.5,
            "cpu_s_per_step": 0.4, "peak_rss_mb": rss, "adapter_bytes": 4096, "steps": 10,
            "versions": {"torch": "2.x", "peftlab": "0.1.0"},
            "machine": {"platform": "Linux", "cpus": 2, "torch_threads": 1, "load_average_before": 0.5}}


@pytest.fixture
def results(tmp_path):
    suite = suites.parse({
        "description": "a <fake> suite & its records", "run": {"model": "minilm-l6", "train": {"steps": 10}},
        "tasks": list(TASKS), "seeds": [0, 1], "methods": ["lora", "vera", "dora"], "baselines": ["head-only"],
        "lr": {"default": [1e-3]}, "peer": ["lora"]}, name="fake")
    directory = tmp_path / "results"
    directory.mkdir()
    records = [record(t, m, s) for t in TASKS for m in ROWS for s in (0, 1)]
    records += [record(t, "lora", s, "peft") for t in TASKS for s in (0, 1)]
    records.append({"schema": runner.SCHEMA, "run": "vera--sms-spam--s2", "status": "failed", "phase": "final",
                    "error": "PeftlabError: a | pipe"})
    for r in records:
        runner.write_record(directory / f"{r['run']}.json", r)
    return suite, directory


class Elements(HTMLParser):
    """Every start tag with its attributes, and each table as rows of cell texts."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().replace("\\|", "|").replace("**", "").replace("`", "")
                     for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        elif not line.startswith("|---"):
            current = None
    return tables


def test_the_page_holds_the_reports_tables_a_tab_and_three_plots_per_task(results):
    suite, directory = results
    report_path = report.write_report(suite, directory)
    before = report_path.read_bytes()
    path = page_html.write_html(suite, directory)
    assert path == directory / "report.html" and report_path.read_bytes() == before
    text = path.read_text()
    page = Elements(text)
    # every table of report.md, cell for cell, in the same order (images aside, the same report)
    assert page.tables == markdown_tables(before.decode())
    assert any(row[:2] == ["vera--sms-spam--s2", "PeftlabError: a | pipe"] for table in page.tables for row in table)
    assert [b["data-task"] for b in page.find("button") if "data-task" in b] == list(TASKS)
    assert [b["data-axis"] for b in page.find("button") if "data-axis" in b] == ["trainable", "rss", "train_cpu"]
    assert [p["data-task-panel"] for p in page.find("section") if "data-task-panel" in p] == list(TASKS)
    assert len(page.find("svg")) == 6 and len(page.find("circle", **{"class": "peer"})) == 6
    assert "a &lt;fake&gt; suite &amp; its records" in text  # the suite's text is escaped
    assert "steps: 10" in text and "model: minilm-l6" in text  # the run settings in the setup section
    # self-contained: nothing is fetched (the only URL is the SVG namespace, which is a name)
    assert not re.search(r"\ssrc=|<link|url\(|@import", text)
    assert set(re.findall(r"https?://[^\s\"']+", text)) == {"http://www.w3.org/2000/svg"}


def test_each_axis_has_its_own_pareto_front_and_scale(results):
    suite, directory = results
    table = report.aggregate(runner.read_records(directory), suite)
    fronts = (["head-only", "vera", "lora", "dora"], ["head-only", "dora"], ["head-only", "dora"])
    for column, (axis, expected) in enumerate(zip(page_html.AXES, fronts)):
        page = Elements(page_html.plot_svg(table, "movie-sentiment", axis, "test.accuracy", "max"))
        assert page.find("path", **{"class": "front"})[0]["data-methods"].split() == expected, axis[0]
        points = {c["data-method"]: c for c in page.find("circle") if "data-x" in c}
        assert set(points) == set(ROWS) and points["head-only"]["class"] == "baseline"
        # the mean over seeds 0 and 1 (+0.00, +0.02): 0.80 -> 0.81
        assert math.isclose(float(points["lora"]["data-y"]), 0.81)
        assert {m: float(p["data-x"]) for m, p in points.items()} == {m: v[column] for m, v in ROWS.items()}
        ys = {m: float(p["cy"]) for m, p in points.items()}  # pixels grow downwards: better is higher up
        assert ys["dora"] < ys["lora"] < ys["vera"] < ys["head-only"]
    # log scale for parameters: 1k, 10k, 100k are evenly spaced
    page = Elements(page_html.plot_svg(table, "movie-sentiment", page_html.AXES[0], "test.accuracy", "max"))
    x = {c["data-method"]: float(c["cx"]) for c in page.find("circle") if "data-x" in c}
    assert math.isclose(x["lora"] - x["head-only"], x["dora"] - x["lora"], abs_tol=0.15)
    # linear scale for memory (600 to 1000 MB is less than 10x): 500, 600 and 900 MB at their distances
    page = Elements(page_html.plot_svg(table, "movie-sentiment", page_html.AXES[1], "test.accuracy", "max"))
    x = {c["data-method"]: float(c["cx"]) for c in page.find("circle") if "data-x" in c}
    assert math.isclose((x["lora"] - x["dora"]) / (x["dora"] - x["head-only"]), 3.0, rel_tol=1e-2)


def test_the_command_line_writes_the_page(results, monkeypatch, capsys):
    import argparse

    suite, directory = results
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setattr("peftlab.bench.load", lambda name: suite)
    assert run_from_args(parser.parse_args(["report", "fake", "--results", str(directory), "--html"])) == 0
    assert (directory / "report.html").stat().st_size > 10_000 and (directory / "report.md").exists()
    assert f"results page written to {directory / 'report.html'}" in capsys.readouterr().out


def chromium(url: str, tmp_path, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`; its console messages go to stderr as 'CONSOLE' lines."""
    binary = shutil.which("chromium")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
               "--v=0", f"--user-data-dir={tmp_path / 'profile'}", *options, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium package (make setup installs it)")
def test_the_page_renders_in_chromium_without_console_messages(results, tmp_path):
    from PIL import Image

    suite, directory = results
    report.write_report(suite, directory)
    url = page_html.write_html(suite, directory).as_uri() + "#task=sms-spam&axis=rss"
    shown = chromium(url, tmp_path, "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    console = [line for line in shown.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    dom = Elements(shown.stdout)
    body = dom.find("body")[0]
    assert (body.get("data-task"), body.get("data-axis")) == ("sms-spam", "rss")  # the script ran
    panels = {p["data-task-panel"]: "hidden" in p for p in dom.find("section") if "data-task-panel" in p}
    assert panels == {"movie-sentiment": True, "sms-spam": False}
    plots = [(p["data-axis-plot"], "hidden" in p) for p in dom.find("div") if "data-axis-plot" in p]
    assert [axis for axis, hidden in plots if not hidden] == ["rss", "rss"]
    assert dom.find("button", data_axis="rss")[0]["aria-pressed"] == "true"
    assert len(dom.tables) >= 5

    screenshot = tmp_path / "report.png"
    drawn = chromium(url, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1400")
    assert drawn.returncode == 0 and not [line for line in drawn.stderr.splitlines() if "CONSOLE" in line]
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 1400)
    colours = image.getcolors(maxcolors=1 << 20)
    blue = sum(n for n, (r, g, b) in colours if abs(r - 0x1f) < 12 and abs(g - 0x77) < 12 and abs(b - 0xb4) < 12)
    green = sum(n for n, (r, g, b) in colours if abs(r - 0x2c) < 12 and abs(g - 0xa0) < 12 and abs(b - 0x2c) < 12)
    # the legend's key is ~60 blue pixels; sms-spam's three method points add ~40 each; only the front is green
    assert blue > 120 and green > 50
