"""Small helpers shared by tests: local servers, and checkpoints written as earlier versions did."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def start_dashboard(storage: str, artifact_dir: Path) -> tuple[subprocess.Popen, str]:
    """optuna-dashboard on a free loopback port, once it answers: (process, base URL)."""
    port = free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(exe), storage, "--artifact-dir", str(artifact_dir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            http_get(f"{base}/api/studies")
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard exited: {proc.stderr.read()}")
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("optuna-dashboard did not answer within 30 s")


def format3(payload: dict) -> dict:
    """A one-recipe checkpoint payload as format 3 wrote it: the recipe's fields at the top level."""
    (recipe,) = payload["recipes"]
    shared = {k: v for k, v in payload.items() if k != "recipes"}
    return {**shared, **{k: v for k, v in recipe.items() if k != "weight"}, "format": 3}
