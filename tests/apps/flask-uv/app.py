"""flask test app for corral: GET / describes the release, GET /healthz answers "ok"."""

import os
from pathlib import Path

from flask import Flask, Response, jsonify

APP_NAME = "flask-uv"
HERE = Path(__file__).resolve().parent

app = Flask(__name__)


@app.get("/")
def index() -> Response:
    return jsonify(
        app=APP_NAME,
        version=(HERE / "VERSION").read_text(encoding="utf-8").strip(),
        greeting=os.environ.get("GREETING"),
        secret_set="API_TOKEN" in os.environ,
    )


@app.get("/healthz")
def healthz() -> tuple[str, int, dict[str, str]]:
    return "ok", 200, {"Content-Type": "text/plain; charset=utf-8"}
