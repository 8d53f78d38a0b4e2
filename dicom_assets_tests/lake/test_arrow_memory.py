"""Arrow allocates through the system allocator in every lake process, unless the user chose a pool."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import warnings; warnings.simplefilter('ignore')\n"
    "import pyarrow as pa\n"
    "import dicom_assets.definitions\n"
    "from dicom_assets.engines.helper import init_worker\n"
    "from dicom_assets.engines.helper_pool import HelperPool\n"
    "from dicom_assets.lake.arrow_memory import backend_name\n"
    "if __name__ == '__main__':\n"
    "    with HelperPool(1, init_worker) as pool:\n"
    "        pool.submit(backend_name)\n"
    "        print(pa.default_memory_pool().backend_name, *pool.collect(block=True))\n"
)


def _backends(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180, check=True)
    return done.stdout.split()


def test_dagster_processes_and_pool_workers_use_the_system_allocator() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backends(env) == ["system", "system"]


def test_a_pool_the_user_chose_is_kept() -> None:
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}
    assert _backends(env) == ["mimalloc", "mimalloc"]
