"""Screenshots of what a user opens after a compress run, taken in a real browser.

Starts a Prefect server (with its UI) and registers the compress flow as a deployment, runs the
compress flow on the demo defaults (a short heal) against it and a fresh sqlite MLflow store,
starts `mlflow server` on that store, and has headless Chromium (Debian's `chromium` package)
capture the MLflow run page, the report (report.html) in MLflow's artifact viewer, the model version page
and Prefect's form for a custom run of the deployment, into docs/screenshots/.

    python docs/screenshots.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def shoot(url: str, name: str, height: int = 1100) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1440,{height}", "--virtual-time-budget=25000",
                    "--run-all-compositor-stages-before-draw", f"--screenshot={OUT / name}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{OUT / name}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="heal steps of the compress run")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="starfish-screenshots-"))
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": api, "PREFECT_LOGGING_EXTRA_LOGGERS": "starfish"}
    processes = []
    try:
        prefect = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(prefect_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        processes.append(prefect)
        wait_for(f"{api}/health", prefect)
        env["PREFECT_API_URL"] = api
        register = ("from flows.compress import compress; "
                    "print(compress.to_deployment(name='compress').apply())")
        deployment = subprocess.run([sys.executable, "-c", register], cwd=ROOT, env=env, check=True,
                                    capture_output=True, text=True).stdout.split()[-1]
        store = f"sqlite:///{folder / 'mlflow.db'}"
        subprocess.run([sys.executable, "-m", "flows.compress", "--workdir", str(folder / "work"), "--calibration",
                        str(folder / "calibration.json"), "--tracking-uri", store, "--set", f"heal.steps={args.steps}"],
                       cwd=ROOT, env=env, check=True)
        mlflow = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                                   "--host", "127.0.0.1", "--port", str(mlflow_port)], cwd=folder, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        processes.append(mlflow)
        ui = f"http://127.0.0.1:{mlflow_port}"
        wait_for(f"{ui}/health", mlflow)

        from mlflow import MlflowClient

        client = MlflowClient(store)
        [model] = client.search_registered_models()
        version = client.get_model_version_by_alias(model.name, "challenger")
        experiment = client.get_run(version.run_id).info.experiment_id
        run_page = f"{ui}/#/experiments/{experiment}/runs/{version.run_id}"
        shoot(run_page, "mlflow-run.png", 1400)
        shoot(f"{run_page}/artifacts/report/report.html", "mlflow-report.png", 1400)
        shoot(f"{ui}/#/models/{model.name}/versions/{version.version}", "mlflow-version.png", 1300)
        shoot(f"http://127.0.0.1:{prefect_port}/deployments/deployment/{deployment}/run", "prefect-run-form.png", 2400)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
