"""A throw-away Spark standalone cluster on 127.0.0.1, for tests and benchmarks.

Starts one Master and N Workers from the pip-installed pyspark
(``bin/spark-class org.apache.spark.deploy.master.Master`` / ``...worker.Worker``),
each in its own process group so :meth:`StandaloneCluster.stop` can end the JVM
and anything it spawned, and waits until every worker is ALIVE in the master's
JSON status (``http://127.0.0.1:<webui>/json``). Nothing binds beyond loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"


def spark_home() -> Path:
    """The Spark distribution bundled with pyspark (``$SPARK_HOME`` wins when set)."""
    env = os.environ.get("SPARK_HOME")
    if env and (Path(env) / "bin" / "spark-class").exists():
        return Path(env)
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class StandaloneCluster:
    """A running master and its workers; use as a context manager or call :meth:`stop`."""

    master_url: str
    webui_url: str
    base_dir: Path
    worker_dirs: list[Path]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        """The master's JSON status (workers, cores, running applications)."""
        with urllib.request.urlopen(self.webui_url + "/json", timeout=5) as resp:
            return dict(json.load(resp))

    def alive_workers(self) -> int:
        try:
            return sum(1 for w in self.status().get("workers", []) if w.get("state") == "ALIVE")
        except OSError:
            return 0

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate every process group started (workers first), killing stragglers."""
        for proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # executors the worker forked share its group
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()

    def __enter__(self) -> StandaloneCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_cluster(
    base_dir: Path,
    *,
    workers: int = 2,
    cores: int = 1,
    memory: str = "1g",
    timeout: float = 90.0,
) -> StandaloneCluster:
    """Start a master and ``workers`` workers (``cores`` and ``memory`` each) on loopback.

    Logs go to ``base_dir/logs``, each worker's application folders to
    ``base_dir/worker-<i>``. Raises ``TimeoutError`` (after stopping what it
    started) when the workers do not all register within ``timeout`` seconds.
    """
    home = spark_home()
    spark_class = str(home / "bin" / "spark-class")
    base_dir.mkdir(parents=True, exist_ok=True)
    log_dir = base_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": LOOPBACK,
        "SPARK_LOG_DIR": str(log_dir),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_NO_DAEMONIZE": "1",
    }
    port, webui = free_port(), free_port()
    cluster = StandaloneCluster(
        master_url=f"spark://{LOOPBACK}:{port}",
        webui_url=f"http://{LOOPBACK}:{webui}",
        base_dir=base_dir,
        worker_dirs=[],
    )
    try:
        cluster.processes.append(
            _launch(
                [spark_class, "org.apache.spark.deploy.master.Master",
                 "--host", LOOPBACK, "--port", str(port), "--webui-port", str(webui)],
                env, log_dir / "master.log",
            )
        )
        _wait(lambda: _reachable(cluster), timeout, "master web UI", cluster)
        for i in range(workers):
            wdir = base_dir / f"worker-{i}"
            wdir.mkdir(exist_ok=True)
            cluster.worker_dirs.append(wdir)
            wenv = {**env, "SPARK_WORKER_DIR": str(wdir)}
            cluster.processes.append(
                _launch(
                    [spark_class, "org.apache.spark.deploy.worker.Worker",
                     "--host", LOOPBACK, "--cores", str(cores), "--memory", memory,
                     "--work-dir", str(wdir), "--webui-port", str(free_port()), cluster.master_url],
                    wenv, log_dir / f"worker-{i}.log",
                )
            )
        _wait(lambda: cluster.alive_workers() >= workers, timeout, f"{workers} workers", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _reachable(cluster: StandaloneCluster) -> bool:
    try:
        cluster.status()
        return True
    except OSError:
        return False


def _wait(ready: Any, timeout: float, what: str, cluster: StandaloneCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p.args for p in cluster.processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"Spark process exited while waiting for {what}: {dead[0]!r} (see {cluster.base_dir / 'logs'})")
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (see {cluster.base_dir / 'logs'})")


__all__ = ["LOOPBACK", "StandaloneCluster", "free_port", "spark_home", "start_cluster"]
