"""`recsvc-serve` as a real process: serves, exposes /metrics, and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from recsvc.client import RecsvcClient
from recsvc.server import free_port
from tests.helpers.running_server import FIRST_VERSION, copy_root

REPO = Path(__file__).resolve().parents[2]


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    seen = []
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)}")


def test_serve_answers_exposes_metrics_and_exits_cleanly_on_sigterm(
    bundle_root: Path, tmp_path: Path
) -> None:
    root = copy_root(bundle_root, tmp_path / "bundles")
    metrics_port = free_port()
    env = {
        **os.environ,
        "RECSVC_EVENTS_DB": str(tmp_path / "events.sqlite"),
        "RECSVC_METRICS_PORT": str(metrics_port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsvc.server", "--bundles", str(root), "--port", "0"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(_wait_for_line(proc, r"ready on port (\d+)", timeout=60).group(1))
        with RecsvcClient(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
            assert client.recommend("cli-proc-user", 3).model_version == FIRST_VERSION
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'recsvc_requests_total{code="OK",method="Recommend"} 1.0' in body
        assert f'recsvc_bundle_info{{version="{FIRST_VERSION}"}} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        _wait_for_line(proc, r"server stopped", timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_port_in_use_exits_2_naming_the_address_without_a_traceback(
    bundle_root: Path, tmp_path: Path
) -> None:
    import socket

    root = copy_root(bundle_root, tmp_path / "bundles")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "recsvc.server", "--bundles", str(root), "--port", str(port)],
            cwd=REPO,
            env={
                **os.environ,
                "RECSVC_EVENTS_DB": str(tmp_path / "events.sqlite"),
                "RECSVC_METRICS_PORT": "0",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"recsvc-serve: error: cannot bind 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_refuses_an_unknown_log_level_with_usage_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recsvc.server", "--bundles", str(tmp_path), "--log-level", "LOUD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--log-level: invalid choice: 'LOUD'" in proc.stderr
    assert "Traceback" not in proc.stderr
