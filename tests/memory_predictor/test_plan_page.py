"""The shareable plan page: self-contained, escaped, and rendered by a real headless Chromium.

Chromium (Debian's ``chromium``; scripts/test.sh installs it) opens each page from a file with the
network unused: the page must load with no console error, no uncaught exception and no request
but its own file, draw its heatmap, and give a screenshot that is not blank. The harness is
shown to catch each of those failures on deliberately broken pages.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from memory_predictor.cli import main
from tests.e2e import launcher, only_run
from tests.memory_predictor.chromium import INSTALL, PageResult, chromium_path, load_page

HEATMAP_CELLS = "document.body.getAttribute('data-heatmap-cells')"
P5_PLAN = ["plan", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--nodes", "32", "--seq", "8192", "--gbs", "1024",
           "--tokens", "314B", "--price-per-node-hour", "55"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.fail(f"the page tests need a real Chromium: {INSTALL}")
    return path


def pixels(png: bytes):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    return np.asarray(image.open(io.BytesIO(png)).convert("RGB"), dtype=float)


def assert_rendered(result: PageResult, page: Path) -> None:
    assert result.exceptions == [], result.exceptions
    assert result.console_errors == [], result.console_errors
    assert result.requests == [page.resolve().as_uri()], result.requests  # nothing fetched but the page itself
    image = pixels(result.png)
    assert image.shape[0] > 600 and image.shape[1] == 1000
    assert image.std() > 20  # not blank: text, bars and a coloured heatmap
    colours = {tuple(c) for c in image[::7, ::7].reshape(-1, 3).astype(int).tolist()}
    assert len(colours) > 50


def self_contained(text: str) -> None:
    """No resource outside the file: every src/href is data: or a fragment, no URL to fetch."""
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", text)
    assert all(r.startswith(("data:", "#")) for r in refs), refs
    assert "http://" not in text and "https://" not in text and "@import" not in text


# --------------------------------------------------------------------------- pure rendering


def test_plan_report_page_has_every_part(tmp_path: Path, capsys) -> None:
    page = tmp_path / "plan.html"
    assert main([*P5_PLAN, "--report", str(page), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    text = page.read_text()
    self_contained(text)
    for part in ("ideal", "planned", "expected", "Young", "milestone", "10%", "25%", "50%", "75%", "90%", "100%",
                 "Layout space: TP x PP", "sel-cp", "sel-vpp", "sel-mbs", "Memory of the chosen layout",
                 "activations in flight", "GPU-hours", "per node-hour", "Llama 3 (Dubey et al. 2024"):
        assert part in text, part
    assert f"{plan['expected_cost']:,.0f}" in text
    data = json.loads(re.search(r"<script id='hl-data' type='application/json'>(.*?)</script>", text, re.S).group(1))
    assert data["plan"]["expected_s"] == pytest.approx(plan["expected_s"])
    assert len(data["space"]["rows"]) > 1000 and data["chosen"]["layout"]["tp"] == plan["best"]["tp"]
    assert any(not r[-1] for r in data["space"]["rows"])  # layouts that do not fit are shown too


def test_hostile_names_are_escaped(tmp_path: Path, capsys) -> None:
    hostile = "a'\"><script>alert(1)</script><!--"
    cfg = {"_name_or_path": hostile, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4,
           "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    page = tmp_path / "p.html"
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--gpu", "h100-80gb", "--nodes", "1", "--seq",
                 "1024", "--gbs", "8", "--steps", "100", "--report", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text()
    assert "<script>alert(1)" not in text and "<!--" not in text
    assert text.count("<script") == 2 and text.count("</script>") == 2  # the data block and the heatmap code
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_unwritable_report_is_refused_before_the_search(tmp_path: Path, capsys) -> None:
    assert main([*P5_PLAN, "--report", str(tmp_path / "missing" / "p.html")]) == 2
    assert "--report" in capsys.readouterr().err


# --------------------------------------------------------------------------- real Chromium


@pytest.mark.timeout(300)
def test_chromium_renders_the_plan_page_and_its_selectors(chromium: str, tmp_path: Path, capsys) -> None:
    page = tmp_path / "plan.html"
    assert main([*P5_PLAN, "--report", str(page), "--json"]) == 0
    capsys.readouterr()
    result = load_page(page, expression=HEATMAP_CELLS)
    assert_rendered(result, page)
    assert int(result.value) >= 4  # TP x PP cells drawn by the script
    # every selector, every option: the heatmap redraws without an error
    change_all = """(function () {
      var out = [];
      document.querySelectorAll('select').forEach(function (s) {
        for (var i = 0; i < s.options.length; i++) {
          s.selectedIndex = i; s.dispatchEvent(new Event('change'));
          out.push(document.querySelectorAll('#heatmap td').length);
        }
      });
      return out;
    })()"""
    result = load_page(page, expression=change_all)
    assert_rendered(result, page)
    assert len(result.value) > 10 and all(n > 0 for n in result.value)


@pytest.mark.timeout(300)
def test_chromium_renders_run_pages_before_and_after_training(chromium: str, tmp_path: Path, capsys) -> None:
    proc = launcher("config=tiny_local", "training.train_steps=8", f"runs_root={tmp_path / 'runs'}",
                    "cluster.price_per_node_hour=3.5", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    at_launch = run / "plan.html"
    result = load_page(at_launch, expression="document.body.innerText")
    assert_rendered(result, at_launch)
    assert "No training steps logged yet" in result.value and "3.5 per node-hour" in result.value
    after = tmp_path / "after.html"
    assert main(["report", "--run", str(run), "--out", str(after)]) == 0
    assert "8 steps logged" in capsys.readouterr().out
    self_contained(after.read_text())
    result = load_page(after, expression="document.body.innerText")
    assert_rendered(result, after)
    assert "Predicted vs measured" in result.value and "max RSS" in result.value
    assert "8 steps logged" in result.value


@pytest.mark.timeout(120)
def test_the_harness_catches_errors_requests_and_blank_pages(chromium: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><title>x</title><body><p>x</p><img src='http://127.0.0.1:9/x.png'>"
                      "<script>console.error('boom'); undefinedFunction();</script></body>")
    result = load_page(broken)
    assert any("undefinedFunction" in e for e in result.exceptions)
    assert any("boom" in e for e in result.console_errors)
    assert "http://127.0.0.1:9/x.png" in result.requests
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>blank</title><body></body>")
    result = load_page(blank)
    assert result.exceptions == [] and pixels(result.png).std() < 1
