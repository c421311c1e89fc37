"""Start and stop the real cloud and edge services as processes.

The demo, the experiments and the integration tests all run the services
exactly as a user does, through ``run_cloud.sh`` and ``run_edge.sh``
(gunicorn), so what they measure is what gets deployed. Every wait here is
bounded, and ``stop()`` kills the whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import requests
import yaml

__all__ = ["REPO_ROOT", "ServiceProcess", "ServiceError", "free_port", "service_environment", "start_cloud", "start_edge"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_SETUP_VARIABLES = ("POPEX_PIP_ARGS", "POPEX_NO_APT")  # how to install, not how to run: passed on


class ServiceError(RuntimeError):
    """A service did not start, or died; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """One service started by a run_*.sh script, with its log on disk."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log_tail(self, n_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n_lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, path: str = "/healthz", *, timeout_s: float = 90.0) -> None:
        """Poll ``url + path`` until it answers 200 (the app is built, not just the socket bound)."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + path, timeout=2.0).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise ServiceError(f"{self.name} not ready at {self.url}{path} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Terminate the process group (gunicorn and its worker); idempotent."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def service_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment less its POPEX_* settings, plus ``env``.

    A developer's ``POPEX_EDGE_CONFIG``, ``POPEX_CLOUD_URL``, ... must not
    reach a service the harness starts: its settings are exactly what the
    harness passes. The set-up switches (``POPEX_PIP_ARGS``, ``POPEX_NO_APT``)
    stay, since they only say how to install.
    """
    kept = {key: value for key, value in os.environ.items()
            if not key.startswith("POPEX_") or key in _SETUP_VARIABLES}
    return {**kept, **env}


def _start(name: str, argv: Sequence[str], env: Mapping[str, str], url: str, log_path: Path,
           prefix: Sequence[str] = ()) -> ServiceProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    process = subprocess.Popen([*prefix, *argv], cwd=REPO_ROOT, env=service_environment(env), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return ServiceProcess(name=name, url=url, process=process, log_path=log_path, _log=log)


def start_cloud(*, token: str, state_dir: Path, log_path: Path, host: str = "127.0.0.1", port: int | None = None,
                n_threads: int = 4, prefix: Sequence[str] = ()) -> ServiceProcess:
    """Start ``run_cloud.sh``; call ``wait_ready()`` before use.

    ``prefix`` runs it under another command (``ip netns exec NAME``).
    """
    port = free_port(host if not prefix else "127.0.0.1") if port is None else port
    argv = [str(REPO_ROOT / "run_cloud.sh"), "--host", host, "--port", str(port), "--state-dir", str(state_dir),
            "--threads", str(n_threads)]
    return _start("cloud", argv, {"POPEX_TOKEN": token}, f"http://{host}:{port}", log_path, prefix)


def start_edge(*, token: str, cloud_url: str, state_dir: Path, log_path: Path, host: str = "127.0.0.1",
               port: int | None = None, emulate_link: str | None = None, edge_slowdown: float = 1.0,
               config: Mapping[str, Any] | None = None, n_threads: int = 4) -> ServiceProcess:
    """Start ``run_edge.sh`` with ``configs/edge.yaml`` overlaid by ``config``; call ``wait_ready()``.

    The overlay is written next to the log as YAML and passed as
    ``POPEX_EDGE_CONFIG``, the same way a user points the edge at their own file.
    """
    port = free_port(host) if port is None else port
    values = dict(config or {})  # configs/edge.yaml sets no key (defaults live in EdgeConfig); the edge checks these
    config_path = log_path.with_suffix(".yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(values))
    argv = [str(REPO_ROOT / "run_edge.sh"), "--host", host, "--port", str(port), "--cloud-url", cloud_url,
            "--state-dir", str(state_dir), "--threads", str(n_threads),
            "--emulate-edge-slowdown", f"{edge_slowdown:g}"]
    if emulate_link:
        argv += ["--emulate-link", emulate_link]
    env = {"POPEX_TOKEN": token, "POPEX_EDGE_CONFIG": str(config_path)}
    return _start("edge", argv, env, f"http://{host}:{port}", log_path)
