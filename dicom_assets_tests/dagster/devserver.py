"""A real ``dagster dev`` (web server + daemon) on 127.0.0.1 for tests, and helpers to drive it.

The server runs the project's ``workspace.yaml`` against a temporary
``DAGSTER_HOME`` holding the project's ``dagster.yaml`` (so the run queue and
its per-partition limit are the real ones) and a temporary lake.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
#: One process per run instead of one per step: same code paths, seconds instead of a minute.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_home(parent: Path) -> Path:
    home = parent / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    return home


@dataclass
class DevServer:
    port: int
    home: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert "errors" not in out, out["errors"]
        return out["data"]

    def launch(self, partition: str, tags: dict[str, str] | None = None, run_config: dict[str, Any] | None = None) -> str:
        """Submit one run of ``all_assets_job`` for ``partition`` (queued by the run coordinator)."""
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.port)
        return client.submit_job_execution(
            "all_assets_job",
            run_config=run_config if run_config is not None else IN_PROCESS,
            tags={"dagster/partition": partition, **(tags or {})},
        )


def _ready(server: DevServer) -> bool:
    try:
        data = server.graphql(
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
            "locationOrLoadError { __typename } } } } }"
        )
    except OSError:
        return False
    entries = data["workspaceOrError"].get("locationEntries") or []
    if any(e["locationOrLoadError"] and e["locationOrLoadError"]["__typename"] == "PythonError" for e in entries):
        raise AssertionError(f"code location failed to load; see {server.log}")
    return bool(entries) and all(
        e["loadStatus"] == "LOADED" and e["locationOrLoadError"] and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        for e in entries
    )


@contextmanager
def dagster_dev(home: Path, env: dict[str, str], *, timeout: float = 180.0) -> Iterator[DevServer]:
    """Start ``dagster dev -h 127.0.0.1`` and wait until the code location has loaded."""
    port = free_port()
    log = home / "dagster_dev.log"
    full_env = {**os.environ, **env, "DAGSTER_HOME": str(home), "DAGSTER_TELEMETRY_DISABLED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(DAGSTER), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(PROJECT / "workspace.yaml")],
            cwd=PROJECT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = DevServer(port, home, log, proc)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(server):
            if proc.poll() is not None:
                raise AssertionError(f"dagster dev exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dagster dev not ready after {timeout}s; see {log}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (its own session, so its process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the code server and run workers it left behind
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def wait_for_runs(instance: Any, run_ids: list[str], *, timeout: float = 300.0) -> list[Any]:
    """Poll the instance until every run has finished; return their run records."""
    import dagster as dg

    deadline = time.monotonic() + timeout
    while True:
        records = instance.get_run_records(filters=dg.RunsFilter(run_ids=run_ids))
        if len(records) == len(run_ids) and all(r.dagster_run.status.value in DONE for r in records):
            return records
        if time.monotonic() > deadline:
            states = {r.dagster_run.run_id: r.dagster_run.status.value for r in records}
            raise AssertionError(f"runs not finished after {timeout}s: {states}")
        time.sleep(0.5)
