"""`starfish serve-bench` as `make serving` runs it, cut to one served form, two clients and a few
seconds: the slim demo ViT registered, served by `starfish serve` on loopback, and loaded with the
mix of good, malformed, too large and deadline-hitting requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_serve_bench_answers_every_class_as_it_should(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving"
    run = subprocess.run([sys.executable, "-m", "starfish.cli", "serve-bench", "--out", str(out), "--clients", "2",
                          "--seconds", "4", "--forms", "none"], cwd=repo_root, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "serving.json").read_text())
    [row] = summary["rows"]
    classes = row["classes"]
    assert all(classes[kind]["requests"] for kind in ("good", "malformed")), classes
    # a good request is answered with the file's own logits, or stopped at the deadline under load
    assert set(classes["good"]["statuses"]) <= {"200", "504"}, classes["good"]
    assert classes["good"]["as_expected"] == classes["good"]["statuses"].get("200", 0), classes["good"]
    for kind in ("malformed", "too many"):
        assert set(classes[kind]["statuses"]) <= {"400"}, classes[kind]
    assert set(classes["slow"]["statuses"]) <= {"504", "200"}, classes["slow"]
    assert row["refusals_not_one_line"] == 0 and row["connection_errors"] == 0, row
    assert row["cpu_s_in_the_second_after"] < 0.2, row  # the server idles once the load stops
    assert row["memory"] and row["rss_mb_peak"] >= row["rss_mb_idle"] > 0
    assert "| none |" in (out / "serving.md").read_text() and (out / "serving.png").stat().st_size > 0
