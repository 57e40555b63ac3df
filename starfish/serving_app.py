"""The HTTP app `starfish serve` runs: MLflow's own scoring app (`mlflow.pyfunc.scoring_server`,
what `mlflow models serve` runs) around the registered pyfunc, with every error answer cut to one
line of JSON. MLflow's own refusals repeat the request: a body that is not JSON, or one that its
signature check rejects, comes back with every pixel in the message, over many lines; and its
request timeout answers plain text. The pyfunc's own answers (`starfish.serving`) are one line
already and pass unchanged."""

from __future__ import annotations

import json
import os
from typing import Any

MODEL_URI_ENV = "STARFISH_SERVE_MODEL_URI"
MAX_MESSAGE = 300


def one_line(message: str) -> str:
    """MLflow's message without the request it repeats: its reason, on one line."""
    if "\n" not in message and len(message) <= MAX_MESSAGE:
        return message
    if message.startswith("Invalid input."):  # not JSON: the parser's reason, then "Input: <the body>"
        line = message.split("\n", 1)[0]
    elif "Error: " in message:  # "Failed to predict data '<the request>' ... Error: <the reason>"
        line = "the request does not fit the model's signature: " + message.rsplit("Error: ", 1)[1].split("\n")[0]
    else:
        line = next((part for part in message.splitlines() if part.strip()), "the request was refused")
    return line.strip()[:MAX_MESSAGE]


def build(model: Any) -> Any:
    """MLflow's scoring app for a loaded pyfunc `model`, its error answers one line of JSON each."""
    from fastapi import Request
    from fastapi.responses import Response
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(model)

    @app.middleware("http")  # added last, so it wraps MLflow's timeout middleware too
    async def one_line_errors(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if response.status_code < 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise ValueError
        except ValueError:
            answer = {"error_code": "DEADLINE_EXCEEDED" if response.status_code == 504 else "INTERNAL_ERROR",
                      "message": body.decode("utf-8", "replace")}
        answer["message"] = one_line(str(answer.get("message", "")))
        return Response(json.dumps(answer), status_code=response.status_code, media_type="application/json")

    return app


def app() -> Any:
    """uvicorn's factory (`uvicorn --factory starfish.serving_app:app`): the model named by
    STARFISH_SERVE_MODEL_URI, loaded as `mlflow models serve` loads it."""
    from mlflow.pyfunc import scoring_server

    return build(scoring_server.load_model_with_mlflow_config(os.environ[MODEL_URI_ENV]))
