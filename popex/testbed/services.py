"""Start and stop the real cloud and edge services as processes.

The demo, the experiments and the integration tests all run the services
exactly as a user does, through ``run_cloud.sh`` and ``run_edge.sh``
(gunicorn), so what they measure is what gets deployed. Every wait here is
bounded, and ``stop()`` kills the whole process group.

A launched service sees only the configuration the testbed gives it: every
``POPEX_*`` variable of the caller's environment (a developer's
``POPEX_EDGE_CONFIG``, ``POPEX_TOKEN``, ``POPEX_EMULATE_LINK``...) is
dropped, and each service gets its own YAML file, written next to its log
from the checkout's ``configs/edge.yaml`` or ``configs/cloud.yaml`` and the
caller's overrides, so that what a test or an experiment measures does not
depend on who runs it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import requests
import yaml

from popex.errors import ConfigError
from popex.settings import documented_settings

__all__ = [
    "REPO_ROOT",
    "ServiceProcess",
    "ServiceError",
    "free_port",
    "service_environ",
    "start_cloud",
    "start_edge",
    "write_service_config",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_EDGE_DEFAULTS = REPO_ROOT / "configs" / "edge.yaml"
#: The model a testbed edge registers at start unless its config names one: the light B-AlexNet, so that
#: tests and experiments do not depend on (nor wait for) the product's default model.
TESTBED_MODEL_DIR = REPO_ROOT / "models" / "b-alexnet"
_CLOUD_DEFAULTS = REPO_ROOT / "configs" / "cloud.yaml"
# Every variable that configures a POPEX service starts with this.
_ENV_PREFIX = "POPEX_"


def _start(name: str, argv: Sequence[str], env: Mapping[str, str], url: str, log_path: Path,
           prefix: Sequence[str] = (), admin_token: str | None = None) -> ServiceProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    process = subprocess.Popen([*prefix, *argv], cwd=REPO_ROOT, env=service_environ(env), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return ServiceProcess(name=name, url=url, process=process, log_path=log_path, admin_token=admin_token,
                          _log=log)


class ServiceError(RuntimeError):
    """A service did not start, or died; the message ends with its log's tail."""


@dataclass
class ServiceProcess:
    """One service started by a run_*.sh script, with its log on disk.

    ``admin_token`` is the edge's (None for the cloud): :meth:`admin_headers`
    is what a write on the edge sends.
    """

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    admin_token: str | None = field(repr=False, default=None)
    _log: Any = field(repr=False, default=None)

    def admin_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <admin token>"}`` for the edge's writes.

        Raises
        ------
        ServiceError
            If the service has no admin token (the cloud).
        """
        if self.admin_token is None:
            raise ServiceError(f"the {self.name} service has no admin token")
        return {"Authorization": f"Bearer {self.admin_token}"}

    def pids(self) -> list[int]:
        """Every live process of the service: the process group it started in (run_*.sh, gunicorn, workers,
        and any child they run meanwhile)."""
        leader, pids = self.process.pid, []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == leader:
                        pids.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    continue
        return pids

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``.

    Parameters
    ----------
    host : str
        The address to bind.

    Returns
    -------
    int
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def service_environ(env: Mapping[str, str], *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched service: ``base`` without any ``POPEX_*`` variable, then ``env``.

    Parameters
    ----------
    env : mapping of str to str
        What the testbed sets (``POPEX_TOKEN``, ``POPEX_EDGE_CONFIG``...).
    base : mapping of str to str, optional
        The inherited environment (default ``os.environ``): ``PATH``,
        ``HOME`` and the like pass, a developer's POPEX settings do not.

    Returns
    -------
    dict of str to str

    Examples
    --------
    >>> service_environ({"POPEX_TOKEN": "t"}, base={"PATH": "/bin", "POPEX_EDGE_CONFIG": "/mine.yaml"})
    {'PATH': '/bin', 'POPEX_TOKEN': 't'}
    """
    base = os.environ if base is None else base
    return {**{key: value for key, value in base.items() if not key.startswith(_ENV_PREFIX)}, **env}


def write_service_config(defaults_path: Path, overrides: Mapping[str, Any] | None, path: Path) -> Path:
    """Write a service's whole config to ``path``: the YAML at ``defaults_path`` with ``overrides`` on top.

    Parameters
    ----------
    defaults_path : Path
        The checkout's ``configs/edge.yaml`` or ``configs/cloud.yaml``.
    overrides : mapping, optional
        Keys of that file to change.
    path : Path
        Where to write (its folder is created).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        If an override names a key the defaults file neither sets nor documents.
    """
    text = defaults_path.read_text()
    values = yaml.safe_load(text) or {}
    known = set(values) | set(documented_settings(text, where=str(defaults_path)))
    unknown = set(overrides or {}) - known
    if unknown:
        raise ConfigError(f"unknown {defaults_path.stem} config keys {sorted(unknown)}")
    values.update(overrides or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def start_cloud(*, token: str, state_dir: Path, log_path: Path, host: str = "127.0.0.1", port: int | None = None,
                n_threads: int = 4, prefix: Sequence[str] = (), config: Mapping[str, Any] | None = None,
                ) -> ServiceProcess:
    """Start ``run_cloud.sh`` with ``configs/cloud.yaml`` overlaid by ``config``; call ``wait_ready()``.

    The config is written next to the log as YAML and passed as
    ``POPEX_CLOUD_CONFIG``; no other POPEX setting of the caller passes.

    Parameters
    ----------
    token : str
        The shared secret (``POPEX_TOKEN``).
    state_dir, log_path : Path
        The cloud's state folder and its log file.
    host : str
        The address to listen on.
    port : int, optional
        Default: a free one.
    n_threads : int
        gunicorn request threads.
    prefix : sequence of str
        Runs it under another command (``ip netns exec NAME``).
    config : mapping, optional
        Keys of ``configs/cloud.yaml`` to change.

    Returns
    -------
    ServiceProcess
        Started, not yet ready.

    Raises
    ------
    ConfigError
        On an unknown config key.
    """
    port = free_port(host if not prefix else "127.0.0.1") if port is None else port
    config_path = write_service_config(_CLOUD_DEFAULTS, config, log_path.with_suffix(".yaml"))
    argv = [str(REPO_ROOT / "run_cloud.sh"), "--host", host, "--port", str(port), "--state-dir", str(state_dir),
            "--threads", str(n_threads)]
    env = {"POPEX_TOKEN": token, "POPEX_CLOUD_CONFIG": str(config_path)}
    return _start("cloud", argv, env, f"http://{host}:{port}", log_path, prefix)


def start_edge(*, token: str, cloud_url: str, state_dir: Path, log_path: Path, host: str = "127.0.0.1",
               port: int | None = None, emulate_link: str | None = None, edge_slowdown: float = 1.0,
               config: Mapping[str, Any] | None = None, n_threads: int = 4,
               admin_token: str | None = None, prefix: Sequence[str] = ()) -> ServiceProcess:
    """Start ``run_edge.sh`` with ``configs/edge.yaml`` overlaid by ``config``; call ``wait_ready()``.

    The config is written next to the log as YAML and passed as
    ``POPEX_EDGE_CONFIG``, the same way a user points the edge at their own
    file; no other POPEX setting of the caller passes.

    Parameters
    ----------
    token : str
        The shared secret (``POPEX_TOKEN``).
    cloud_url : str
        The cloud's base URL.
    state_dir, log_path : Path
        The edge's state folder and its log file.
    host : str
        The address to listen on.
    port : int, optional
        Default: a free one.
    emulate_link : str, optional
        ``"RATE_MBPS,RTT_MS"``: emulate that uplink in the edge's cloud client.
    edge_slowdown : float
        Emulate an edge device this many times slower than this machine.
    config : mapping, optional
        Keys of ``configs/edge.yaml`` to change.
    n_threads : int
        gunicorn request threads.
    admin_token : str, optional
        ``POPEX_ADMIN_TOKEN``; default: a fresh random one. Either way it is
        the returned process's ``admin_token``.
    prefix : sequence of str
        Runs it under another command (``ip netns exec NAME``: an edge behind a shaped device link).

    Returns
    -------
    ServiceProcess
        Started, not yet ready.

    Raises
    ------
    ConfigError
        On an unknown config key.
    """
    port = free_port(host if not prefix else "127.0.0.1") if port is None else port
    admin_token = secrets.token_hex(16) if admin_token is None else admin_token
    config = {"default_model_dir": str(TESTBED_MODEL_DIR), **(config or {})}
    config_path = write_service_config(_EDGE_DEFAULTS, config, log_path.with_suffix(".yaml"))
    argv = [str(REPO_ROOT / "run_edge.sh"), "--host", host, "--port", str(port), "--cloud-url", cloud_url,
            "--state-dir", str(state_dir), "--threads", str(n_threads),
            "--emulate-edge-slowdown", f"{edge_slowdown:g}"]
    if emulate_link:
        argv += ["--emulate-link", emulate_link]
    env = {"POPEX_TOKEN": token, "POPEX_ADMIN_TOKEN": admin_token, "POPEX_EDGE_CONFIG": str(config_path)}
    return _start("edge", argv, env, f"http://{host}:{port}", log_path, prefix, admin_token=admin_token)
