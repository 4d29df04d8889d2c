"""SIGTERM to `spikingbrain serve`: stop accepting, end the open stream with an error event and
[DONE], exit in bounded time."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_streams_cleanly_and_exits(sb_model_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spikingbrain.cli", "serve", str(sb_model_dir), "--port", str(port),
                             "--shutdown-grace", "1", "--max-tokens-cap", "100000", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]  # it died at start-up
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        r = requests.post(url + "/v1/chat/completions", stream=True, timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000, "stream": True})
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # streaming now
        assert all(x.startswith(b"data: {") for x in got if x)
        proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rest[-1] == b"data: [DONE]"
    err = json.loads(rest[-2][len(b"data: "):])["error"]
    assert err["code"] == "server_shutting_down"
    assert all(b'"error"' not in x for x in rest[:-2])
    # it stopped accepting
    try:
        refused = requests.get(url + "/health", timeout=2).status_code != 200
    except requests.ConnectionError:
        refused = True
    assert refused
