"""`starfish serve-bench`: `starfish serve` under load, on loopback, as a client sees it.

For each served form of the demo ViT with half its MLP neurons and heads removed (the slim model
in float ONNX, and its static int8 model), the model is registered in a scratch MLflow store as
the pipeline registers one, served by `starfish serve` (preflight included) with onnxruntime on
one thread per run and on its default (one per core), and `clients` threads send requests for
`seconds` in each of two phases, each request drawn at random from the phase's mix:

- load, at the shipped deadline (serve.deadline_s, 30 s): good, malformed and too many;
- deadline, at a deadline of half a slow request's run time (measured here first): good and slow.

The classes:
- good: 8 real Fashion-MNIST test images; the answer must equal onnxruntime's logits for the
  same file, run here (`correct`), or the request counts as lost;
- malformed: a body that is not JSON, images of the wrong size, NaN pixels: each must be a 400;
- too many: one image more than the batch bound: a 400;
- slow: the batch bound's images: a 504 once the run is stopped at the deadline, or a 200 where
  the server's run beat the estimate.

It records throughput, p50/p99 latency and the answers by class and HTTP status, and samples the
server's resident memory (its process tree, VmRSS) over time; then the server's CPU use over the
second after the load stops (it should be idle). `results/serving`: serving.json, serving.md and
serving.png (latency by class, memory over time).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from starfish.benchmarks.memory import descendants, status_kb
from starfish.errors import StarfishError
from starfish.io import atomic_write_bytes, atomic_write_json, free_port

log = logging.getLogger(__name__)

MODEL, CHECKPOINT = "starfish_vit_fmnist", "data/demo/starfish_vit_fmnist.safetensors"
STRUCTURE, REMOVED = "neurons+heads", 0.5
FORMS = ("none", "int8-static")  # quant modes: the slim float model and its int8 model
THREADS = (1, 0)  # serve.threads: one per run, and onnxruntime's default (one per core)
GOOD_BATCH = 8
MAX_BATCH = 256  # the server's batch bound (its default), and the slow requests' size
KINDS = ("good", "malformed", "too many", "slow")
PHASES = {"load": {"good": 0.85, "malformed": 0.1, "too many": 0.05}, "deadline": {"good": 0.8, "slow": 0.2}}
SHIPPED_DEADLINE_S = 30.0  # serve.deadline_s's default
LOGIT_TOLERANCE = 1e-4  # served against local onnxruntime logits of the same file
STARTUP_S = 240.0


def run(out: Path, clients: int = 4, seconds: float = 30.0, seed: int = 0, forms: tuple[str, ...] = FORMS,
        threads: tuple[int, ...] = THREADS, data_root: str | None = None) -> dict[str, Any]:
    """Build, register and serve each form, load it, and write `out`'s serving.json, .md and .png."""
    from starfish.config import PipelineConfig

    cfg = PipelineConfig()
    if data_root:
        cfg = cfg.replace(data={"root": data_root})
    from starfish.formats.onnx import run_session, session

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        files, test_images = _served_files(cfg, folder, forms)
        for form, path in files.items():
            reference = run_session(session(path), test_images)
            bodies = _bodies(test_images, reference)
            store = folder / form
            store.mkdir()
            uri, model_uri = _register(store, path, form, test_images[:1], reference[:1])
            for count in threads:
                timing = _deadline(path, test_images, count)
                for phase in PHASES:
                    rows.append(_load_one(store, form, uri, model_uri, bodies, timing, clients, seconds, seed, count,
                                          phase))
    summary = {"model": MODEL, "structure": STRUCTURE, "removed": REMOVED, "clients": clients, "seconds": seconds,
               "seed": seed, "phases": PHASES, "good_batch": GOOD_BATCH, "max_batch": MAX_BATCH,
               "cores": os.cpu_count(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "serving.json", summary)
    atomic_write_bytes(out / "serving.md", markdown(summary).encode())
    plot(summary, out / "serving.png")
    return summary


def _served_files(cfg: Any, folder: Path, forms: tuple[str, ...]) -> tuple[dict[str, Path], np.ndarray]:
    """The slim demo ViT written as each served form, and 512 test images to send."""
    from starfish.benchmarks.frontier import _prunable
    from starfish.formats.onnx import export_onnx
    from starfish.models import create_model
    from starfish.quant.ort import write_int8
    from starfish.steps import dataset

    dense = create_model(MODEL, checkpoint=CHECKPOINT).eval()
    family = cfg.replace(model={"name": MODEL, "checkpoint": CHECKPOINT})
    train, test = dataset(family, "train", dense), dataset(family, "test", dense)
    calibration = torch.stack([train[i][0] for i in range(0, 60000, 250)])  # 240 images, 0.4% of the split
    model, _ = _prunable(dense, STRUCTURE, REMOVED, calibration)
    input_size = tuple(calibration.shape[1:])
    metadata = {"model": MODEL, "input_size": list(input_size), "num_classes": 10}
    files = {}
    for form in forms:
        files[form] = folder / f"{form}.onnx"
        if form == "none":
            export_onnx(model.eval(), files[form], input_size, metadata, calibration[:32])
        else:
            write_int8(model.eval(), files[form], input_size, metadata, form, calibration)
    images = torch.stack([test[i][0] for i in range(512)]).numpy().astype(np.float32)
    return files, images


def _register(folder: Path, path: Path, form: str, example: np.ndarray, logits: np.ndarray) -> tuple[str, str]:
    """`path` registered in a scratch sqlite store in `folder` (its artifacts beside it) as the
    pipeline registers a served file: (the store's URI, the version's URI)."""
    import mlflow
    from mlflow.models import infer_signature

    from starfish.gate import MODEL_NAME_TAG
    from starfish.tracking import log_served_model, use_experiment

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    name = f"serve-bench-{form}"
    with mlflow.start_run(experiment_id=use_experiment(uri)):
        mlflow.set_tag(MODEL_NAME_TAG, MODEL)
        log_served_model(path, "onnx", example, infer_signature(example, logits), name)
    return uri, f"models:/{name}/1"


@contextlib.contextmanager
def _server(uri: str, model_uri: str, deadline: float, threads: int, log_path: Path) -> Iterator[tuple[int, int]]:
    """`starfish serve` as a user runs it, until /ping answers: (its port, its pid)."""
    port = free_port()
    command = [sys.executable, "-m", "starfish.cli", "serve", model_uri, "--port", str(port), "--tracking-uri", uri,
               "--max-batch", str(MAX_BATCH), "--deadline", f"{deadline:.4f}", "--threads", str(threads)]
    with open(log_path, "w") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        while time.monotonic() - start < STARTUP_S:
            if server.poll() is not None:
                raise StarfishError(f"starfish serve {model_uri} exited ({server.returncode}): "
                                    f"{log_path.read_text().strip().splitlines()[-1:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.5)
        else:
            raise StarfishError(f"starfish serve {model_uri} did not answer /ping within {STARTUP_S:g} s")
        yield port, server.pid
    finally:
        for pid in reversed(descendants(server.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        server.wait(timeout=30)


def _deadline(path: Path, images: np.ndarray, threads: int) -> tuple[float, float, float]:
    """A deadline below a slow request's run and far above a good one's: (deadline, the median
    seconds of a good request's run, of a slow one's), timed here in onnxruntime."""
    from starfish.formats.onnx import run_session, session

    sess = session(path, threads or None)
    slow = np.concatenate([images] * (MAX_BATCH // len(images) + 1))[:MAX_BATCH]

    def median_time(batch: np.ndarray) -> float:
        run_session(sess, batch)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run_session(sess, batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    good_s, slow_s = median_time(images[:GOOD_BATCH]), median_time(slow)
    return slow_s / 2, good_s, slow_s


def _bodies(images: np.ndarray, reference: np.ndarray) -> dict[str, list[tuple[bytes, np.ndarray | None]]]:
    """Every request body of each class, encoded once: (body, the logits a good one must get)."""
    def body(batch: Any) -> bytes:
        return json.dumps({"inputs": batch.tolist() if hasattr(batch, "tolist") else batch}).encode()

    good = [(body(images[i:i + GOOD_BATCH]), reference[i:i + GOOD_BATCH])
            for i in range(0, len(images) - GOOD_BATCH + 1, GOOD_BATCH)]
    wrong_size = np.ones((2, images.shape[1], images.shape[2] + 1, images.shape[3]), np.float32)
    nan = images[:2].copy()
    nan[0, 0, 0, 0] = np.nan
    many = np.concatenate([images] * (MAX_BATCH // len(images) + 2))
    return {"good": good,
            "malformed": [(b'{"inputs": [[[', None), (body(wrong_size), None),
                          (json.dumps({"inputs": nan.tolist()}, allow_nan=True).encode(), None)],
            "too many": [(body(many[:MAX_BATCH + 1]), None)],
            "slow": [(body(many[:MAX_BATCH]), None)]}


def _load_one(store: Path, form: str, uri: str, model_uri: str, bodies: dict[str, Any],
              timing: tuple[float, float, float], clients: int, seconds: float, seed: int, threads: int,
              phase: str) -> dict[str, Any]:
    """One row: `model_uri` served with `threads` under the phase's deadline and mix of `bodies`."""
    tight, good_s, slow_s = timing
    deadline = tight if phase == "deadline" else SHIPPED_DEADLINE_S
    mix = PHASES[phase]
    log.info("%s, %s threads, %s phase: good request %.1f ms, slow %.0f ms in onnxruntime here; deadline %.0f ms",
             form, threads or "default", phase, good_s * 1e3, slow_s * 1e3, deadline * 1e3)
    records: list[tuple[str, int, float, bool | None]] = []
    memory: list[tuple[float, float]] = []
    lock = threading.Lock()
    with _server(uri, model_uri, deadline, threads, store / f"server-{threads}-{phase}.log") as (port, pid):
        baseline = _tree_mb(pid)
        stop = time.monotonic() + seconds
        start = time.monotonic()

        def client(index: int) -> None:
            draw = random.Random(seed * 1000 + index)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=deadline + 60)
            while time.monotonic() < stop:
                kind = draw.choices(list(mix), weights=list(mix.values()))[0]
                body, want = draw.choice(bodies[kind])
                sent = time.monotonic()
                try:
                    connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    status, answer = response.status, response.read()
                except (OSError, http.client.HTTPException):
                    status, answer = 0, b""
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=deadline + 60)
                took = time.monotonic() - sent
                correct = None
                if kind == "good":
                    correct = status == 200 and _matches(answer, want)
                elif status not in (0, 200):
                    correct = _one_line_json(answer)
                with lock:
                    records.append((kind, status, took, correct))

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in workers:
            thread.start()
        while any(thread.is_alive() for thread in workers):
            memory.append((round(time.monotonic() - start, 2), round(_tree_mb(pid), 1)))
            time.sleep(0.5)
        elapsed = time.monotonic() - start
        cpu_before = _tree_cpu_s(pid)
        time.sleep(1.0)
        idle_cpu = _tree_cpu_s(pid) - cpu_before
    summary = _summarize(form, records, memory, elapsed, baseline, idle_cpu, deadline, good_s, slow_s)
    return {"threads": threads, "phase": phase, **summary}


def _matches(answer: bytes, want: np.ndarray) -> bool:
    try:
        got = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
    except (ValueError, KeyError, TypeError):
        return False
    return got.shape == want.shape and bool(np.abs(got - want).max() <= LOGIT_TOLERANCE)


def _one_line_json(answer: bytes) -> bool:
    """A refusal's body: valid JSON whose message is one line with no stack trace."""
    try:
        message = json.loads(answer).get("message", "")
    except (ValueError, AttributeError):
        return False
    return bool(message) and "\n" not in message and "Traceback" not in message


def _tree_mb(pid: int) -> float:
    return sum(status_kb("VmRSS", p) for p in descendants(pid)) / 1024


def _tree_cpu_s(pid: int) -> float:
    """User and system CPU seconds of the process tree so far (its live processes)."""
    ticks = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _summarize(form: str, records: list[tuple[str, int, float, bool | None]], memory: list[tuple[float, float]],
               elapsed: float, baseline: float, idle_cpu: float, deadline: float, good_s: float,
               slow_s: float) -> dict[str, Any]:
    classes = {}
    for kind in KINDS:
        mine = [r for r in records if r[0] == kind]
        times = sorted(r[2] for r in mine)
        statuses: dict[str, int] = {}
        for r in mine:
            statuses[str(r[1])] = statuses.get(str(r[1]), 0) + 1
        classes[kind] = {"requests": len(mine), "statuses": statuses,
                         "p50_ms": round(_percentile(times, 50) * 1e3, 1) if times else None,
                         "p99_ms": round(_percentile(times, 99) * 1e3, 1) if times else None,
                         "as_expected": sum(1 for r in mine if r[3])}
    good = classes["good"]
    return {"form": form, "seconds": round(elapsed, 1), "requests": len(records),
            "requests_per_s": round(len(records) / elapsed, 1),
            "good_images_per_s": round(good["as_expected"] * GOOD_BATCH / elapsed, 1),
            "good_lost": good["requests"] - good["as_expected"],
            "refusals_not_one_line": sum(1 for r in records if r[0] != "good" and r[1] not in (0, 200) and not r[3]),
            "connection_errors": sum(1 for r in records if r[1] == 0),
            "deadline_ms": round(deadline * 1e3, 1), "good_run_ms": round(good_s * 1e3, 2),
            "slow_run_ms": round(slow_s * 1e3, 1), "rss_mb_idle": round(baseline, 1),
            "rss_mb_peak": max((m for _, m in memory), default=baseline),
            "cpu_s_in_the_second_after": round(idle_cpu, 3), "classes": classes, "memory": memory}


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# `starfish serve` under load ({summary['model']}, {summary['removed']:.0%} {summary['structure']} "
             "removed)", "",
             f"{summary['clients']} concurrent clients on loopback for {summary['seconds']:g} s per row, on "
             f"{summary['cores']} cores, the clients beside the server; onnxruntime on 1 thread per run or on its "
             "default (one per core). Good = "
             f"{summary['good_batch']} real test images, answered with onnxruntime's logits of the same file (else "
             "lost); malformed (not JSON, wrong size, NaN pixels) and too many (the batch bound "
             f"{summary['max_batch']} + 1) must be a 400 of one JSON line; slow = the batch bound's images. "
             "Regenerate: `make serving` (starfish/benchmarks/serving.py).", ""]
    for phase, mix in summary["phases"].items():
        rows = [row for row in summary["rows"] if row["phase"] == phase]
        title = ("at the shipped deadline (30 s)" if phase == "load" else
                 "at a deadline of half a slow request's run, measured here first")
        lines += [f"## {phase}: {title}, mix {mix}", "",
                  "| served form | threads | requests/s | good images/s | good p50 / p99 ms | good lost | "
                  "good: statuses | others: statuses | refusals not one JSON line | RSS idle / peak MB "
                  "| CPU s in the second after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            c = row["classes"]
            others = {kind: c[kind]["statuses"] for kind in KINDS if kind != "good" and c[kind]["requests"]}
            lines.append(f"| {row['form']} | {row['threads'] or 'default'} | {row['requests_per_s']} | "
                         f"{row['good_images_per_s']} | {c['good']['p50_ms']} / {c['good']['p99_ms']} | "
                         f"{row['good_lost']} of {c['good']['requests']} | {c['good']['statuses']} | {others} | "
                         f"{row['refusals_not_one_line']} | {row['rss_mb_idle']} / {row['rss_mb_peak']} | "
                         f"{row['cpu_s_in_the_second_after']} |")
        lines.append("")
        if phase == "deadline":
            deadlines = [f"{r['form']}, {r['threads'] or 'default'} threads: {r['deadline_ms']} ms (a good "
                         f"request's run {r['good_run_ms']} ms, a slow one's {r['slow_run_ms']} ms)" for r in rows]
            lines += ["Deadlines: " + "; ".join(deadlines) + ".", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(14, 5.5))
    kinds = list(KINDS)
    width = 0.8 / max(len(summary["rows"]), 1)
    for i, row in enumerate(summary["rows"]):
        x = np.arange(len(kinds)) + i * width
        p50 = [row["classes"][k]["p50_ms"] or np.nan for k in kinds]
        p99 = [row["classes"][k]["p99_ms"] or np.nan for k in kinds]
        label = f"{row['form']}, {row['threads'] or 'default'} thr., {row['phase']}"
        latency.bar(x, p99, width, label=label)
        latency.scatter(x, p50, marker="_", color="black", s=60, zorder=3)
        memory.plot([t for t, _ in row["memory"]], [m for _, m in row["memory"]], label=label)
    latency.set_xticks(np.arange(len(kinds)) + width * (len(summary["rows"]) - 1) / 2, kinds)
    latency.set_ylabel("latency (ms): bar p99, black tick p50")
    latency.set_yscale("log")
    latency.set_title(f"{summary['clients']} clients, by request class")
    memory.set_xlabel("seconds under load")
    memory.set_ylabel("server RSS (MB, process tree)")
    memory.set_title("server memory over time")
    handles, labels = latency.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    with tempfile.NamedTemporaryFile(suffix=".png", dir=path.parent, delete=False) as tmp:
        figure.savefig(tmp.name, dpi=110)
    plt.close(figure)
    os.replace(tmp.name, path)
