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
                          "--seconds", "4", "--forms", "none", "--threads", "1"], cwd=repo_root, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "serving.json").read_text())
    load, deadline = summary["rows"]
    assert (load["phase"], deadline["phase"]) == ("load", "deadline")
    # at the shipped deadline nothing good is lost, and every bad request is a 400
    assert load["classes"]["good"]["requests"] and load["good_lost"] == 0, load["classes"]["good"]
    assert load["classes"]["malformed"]["requests"], load["classes"]
    for kind in ("malformed", "too many"):
        assert set(load["classes"][kind]["statuses"]) <= {"400"}, load["classes"][kind]
    # at a deadline below a slow request's run: a good request is answered with the file's own
    # logits or stopped at the deadline, never wrong; a slow one is stopped or beats the estimate
    good = deadline["classes"]["good"]
    assert set(good["statuses"]) <= {"200", "504"} and good["as_expected"] == good["statuses"].get("200", 0), good
    assert set(deadline["classes"]["slow"]["statuses"]) <= {"504", "200"}, deadline["classes"]["slow"]
    for row in (load, deadline):
        assert row["refusals_not_one_line"] == 0 and row["connection_errors"] == 0, row
        assert row["cpu_s_in_the_second_after"] < 0.2, row  # the server idles once the load stops
        assert row["memory"] and row["rss_mb_peak"] >= row["rss_mb_idle"] > 0
    assert "| none | 1 |" in (out / "serving.md").read_text() and (out / "serving.png").stat().st_size > 0
