"""Damaged and hostile ONNX files, and models that fail at serving time, against every path that
opens one: the library (`check_onnx`, a StarfishError), `starfish info` (one line, exit 2), the
serving pyfunc's load, and `starfish serve`'s preflight. Then the HTTP answers of MLflow's own
scoring app around the pyfunc: a client fault is a 400, a model fault (NaN logits, a failing
graph) a 500, a run past the deadline a 504, each with one line of valid JSON and no stack trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from served_models import HOSTILE, SIZE, post, small_model, write

from starfish.errors import StarfishError
from starfish.formats import onnx as formats_onnx
from starfish.formats.onnx import check_onnx
from starfish.serving import StarfishModel


@pytest.mark.parametrize("name,make,words", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_every_hostile_file_is_one_line_from_the_library_info_and_the_pyfunc(
        name: str, make: Callable[[Path], Path], words: str, tmp_path: Path) -> None:
    path = make(tmp_path)
    with pytest.raises(StarfishError, match=f"ONNX file {path}: .*" if name == "random bytes" else None) as raised:
        check_onnx(path)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(StarfishError) as loaded:
        StarfishModel().load_context(SimpleNamespace(artifacts={"onnx": str(path)}))
    assert str(loaded.value) == str(raised.value)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "starfish.cli", "info", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and time.monotonic() - start < 60
    assert run.stderr.strip().splitlines() == [f"starfish: error: {raised.value}"], run.stderr


def test_the_node_bound_is_checked_before_a_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph of more nodes than MAX_NODES (1,000,000 Identity nodes took 36-40 s and 3.2 GB to
    load) is refused on the count, lowered here to the small model's size."""
    path = write(tmp_path / "m.onnx", small_model(hidden=4, layers=3))
    check_onnx(path)
    monkeypatch.setattr(formats_onnx, "MAX_NODES", 4)
    with pytest.raises(StarfishError, match="has more than 4 nodes"):
        check_onnx(path)


def test_a_good_file_passes_and_info_shows_what_it_serves(tmp_path: Path) -> None:
    path = write(tmp_path / "m.onnx", small_model())
    assert check_onnx(path) == {"input_size": "[1, 2, 2]", "model": "small", "num_classes": "3"}
    run = subprocess.run([sys.executable, "-m", "starfish.cli", "info", str(path), "--json"], capture_output=True,
                         text=True, timeout=120, check=True)
    info = json.loads(run.stdout)
    assert (info["format"], info["input"], info["output"], info["quant"]) == ("onnx", [None, 1, 2, 2], [None, 3],
                                                                              "none")


def test_http_answers_client_faults_400_model_faults_500_never_a_stack_trace(scoring_client: Callable) -> None:
    good = np.ones((2, *SIZE)).tolist()
    ok = scoring_client(small_model())
    status, body = post(ok, good)
    assert status == 200 and np.isfinite(body["predictions"]).all()
    for images, words in ((np.ones((2, 1, 3, 3)).tolist(), "does not match expected shape (-1, 1, 2, 2)"),
                          (np.ones((2, 4)).tolist(), "does not match expected shape (-1, 1, 2, 2)"),
                          (np.ones((300, *SIZE)).tolist(), "300 images in one request; send at most 256"),
                          ([[["a"]]], "could not convert string to float")):
        status, body = post(ok, images)
        assert status == 400 and words in body["message"] and "Traceback" not in json.dumps(body), body
        assert "\n" not in body["message"] and "[[" not in body["message"], body  # MLflow's own repeat the request
    response = ok.post("/invocations", content=b'{"inputs": [[[', headers={"Content-Type": "application/json"})
    answer = json.loads(response.text)
    assert response.status_code == 400 and answer["message"].startswith("Invalid input.") and "\n" not in \
        answer["message"], answer
    nan = scoring_client(small_model(bias=np.array([np.nan, 0, 0], np.float32)))
    status, body = post(nan, good)
    assert status == 500 and body["message"] == "the served model failed: it gave NaN or infinite logits", body
    assert "stack_trace" not in body
    assert "Traceback" not in json.dumps(body)


def test_a_run_past_the_deadline_is_stopped_and_the_next_request_answered(scoring_client: Callable) -> None:
    """A graph that takes seconds on a full batch answers 504 within the deadline plus a second,
    its run stopped (no CPU spent after the answer), and the next small request is answered."""
    slow = scoring_client(small_model(hidden=2048, layers=200), deadline=0.3)
    start = time.monotonic()
    status, body = post(slow, np.ones((256, *SIZE)).tolist())
    assert status == 504 and "past the server's deadline of 0.3 s" in body["message"], body
    assert time.monotonic() - start < 0.3 + 1.0 + 1.0  # the deadline, a second, and the JSON of 256 images
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.1  # the stopped run left nothing running
    status, body = post(slow, np.ones((1, *SIZE)).tolist())
    assert status == 200 and len(body["predictions"]) == 1


def test_a_request_over_the_memory_bound_is_refused_before_its_run(
        scoring_client: Callable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each image adds 3 x 1,024 floats and 56 bytes to the run (`bytes_per_image`), so 0.1 MB
    takes 8 images: the ninth is a 400 that says how many fit, before any compute."""
    proto = small_model(hidden=1024, layers=2)
    path = write(tmp_path / "bound.onnx", proto)
    assert formats_onnx.bytes_per_image(path) == 3 * 1024 * 4 + 56
    monkeypatch.setenv("STARFISH_SERVE_MAX_REQUEST_MB", "0.1")
    bounded = scoring_client(proto)
    status, body = post(bounded, np.ones((9, *SIZE)).tolist())
    assert status == 400 and body["message"].startswith("9 images would take up to"), body
    assert "over the server's 0.1 MB (STARFISH_SERVE_MAX_REQUEST_MB); send at most 8" in body["message"], body
    status, body = post(bounded, np.ones((8, *SIZE)).tolist())
    assert status == 200 and len(body["predictions"]) == 8


@pytest.mark.parametrize("flags,words", [(["--max-batch", "0"], "serve.max_batch=0 must be >= 1"),
                                         (["--set", "serve.deadline_s=0"], "serve.deadline_s=0.0 must be > 0"),
                                         (["--max-request-mb", "-1"], "serve.max_request_mb=-1.0 must be > 0")])
def test_serve_bounds_come_from_params_and_flags_and_are_checked(flags: list[str], words: str,
                                                                 tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "starfish.cli", "serve", "models:/none/1", *flags], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("starfish: error: "), run.stderr
    assert words in run.stderr, run.stderr


# Registers an ONNX file as the pipeline does (`tracking.log_served_model`), in a process of its own;
# a third argument tags the run with the model it compressed, as a pipeline run is tagged.
REGISTER = """import sys, numpy as np, mlflow
from mlflow.models import infer_signature
from starfish import tracking
example = np.zeros((1, 1, 2, 2), np.float32)
with mlflow.start_run():
    if len(sys.argv) > 3:
        mlflow.set_tag("starfish.model_name", sys.argv[3])
    tracking.log_served_model(sys.argv[1], "onnx", example, infer_signature(example, np.zeros((1, 3), np.float32)),
                              sys.argv[2])
"""


def replace_registered_file(store: Path) -> None:
    """Overwrite the version's artifact in the store with another model of the same interface."""
    [artifact] = store.glob("mlruns/**/artifacts/m.onnx")
    write(artifact, small_model(bias=np.ones(3, np.float32)))


# Every hostile file that can be registered: a FIFO (which MLflow's copy into the store would read
# forever) and a directory (registration hashes the file) never reach a server.
UNREGISTRABLE = ("a fifo that reads forever", "a directory")
REGISTRABLE = [(make, [], None, words) for name, make, words in HOSTILE if name not in UNREGISTRABLE]


@pytest.mark.parametrize("make,tag,after,words", [
    *REGISTRABLE,
    (lambda d: write(d / "m.onnx", small_model(bias=np.array([np.nan, 0, 0], np.float32))), [], None,
     "it gave NaN or infinite logits"),
    (lambda d: write(d / "m.onnx", small_model()), [], replace_registered_file,
     "it is not what was registered: the file's sha256 is not the "),
    (lambda d: write(d / "m.onnx", small_model()), ["deit_small"], None,
     "it is not what was registered: the file holds 'small' but version 1's run compressed 'deit_small'")],
    ids=[*(name for name, _, _ in HOSTILE if name not in UNREGISTRABLE), "NaN logits",
         "file replaced in the store", "another model than the run's"])
def test_serve_refuses_a_registered_model_that_cannot_serve_before_starting(
        make: Callable[[Path], Path], tag: list[str], after: Callable[[Path], None] | None, words: str,
        tmp_path: Path) -> None:
    """A version registered the way the pipeline registers one, whose file is any of the hostile
    ones, whose model answers NaN, or which is not what the registry recorded: `starfish serve`
    loads it and predicts its input example in a child first, and exits 2 with that one line
    instead of starting a server."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    registered = subprocess.run([sys.executable, "-c", REGISTER, str(make(tmp_path)), "hostile", *tag], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stderr
    if after is not None:
        after(tmp_path)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "starfish.cli", "serve", "models:/hostile/1", "--port", "1",
                          "--preflight-timeout", "120"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and time.monotonic() - start < 150
    [line] = run.stderr.strip().splitlines()[-1:]
    assert line.startswith("starfish: error: models:/hostile/1 cannot be served: ") and words in line, run.stderr
