"""Arrow allocates through the system allocator in every lake process, unless the user chose a pool; freed heap goes back to the system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


TRIM_PROBE = (
    "import threading\n"
    "from dicom_assets.lake.arrow_memory import _glibc, release_unused_memory\n"
    "def rss():\n"
    "    return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
    "kept = []\n"
    "def churn():\n"
    "    # 1 KiB blocks come from malloc (pymalloc stops at 512 B), in this thread's arena;\n"
    "    # keeping every 64th pins the arena's top, so freeing the rest shrinks nothing by itself.\n"
    "    blocks = [bytes(1024) for _ in range(300_000)]\n"
    "    kept.extend(blocks[::64])\n"
    "t = threading.Thread(target=churn); t.start(); t.join()\n"
    "freed = rss()\n"
    "release_unused_memory()\n"
    "print(_glibc() is not None, freed, rss())\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_release_unused_memory_returns_a_freed_thread_heap_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120, check=True)
    has_trim, freed, trimmed = out.stdout.split()
    if has_trim != "True":
        pytest.skip("not glibc: only Arrow's pool is asked")
    # ~300 MiB was allocated; after the trim only the kept 1/64 and the interpreter remain.
    assert int(freed) > 200 and int(trimmed) < int(freed) - 150, out.stdout


MMAP_PROBE = (
    "import ctypes, sys, warnings; warnings.simplefilter('ignore')\n"
    "if sys.argv[1] == 'definitions':\n"
    "    import dicom_assets.definitions\n"
    "class Info(ctypes.Structure):\n"
    "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.mallinfo2.restype = Info\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "libc.free(libc.malloc(16 << 20))  # glibc's dynamic threshold would now rise to 16 MiB\n"
    "before = libc.mallinfo2().hblks\n"
    "block = libc.malloc(1 << 20)\n"
    "print(libc.mallinfo2().hblks - before)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("mode", "env_extra", "mapped"), [
    ("definitions", {}, "1"),  # the threshold stays at 128 KiB: a 1 MiB block gets pages of its own
    ("bare", {}, "0"),  # glibc alone raised it after the 16 MiB block: the 1 MiB block comes from the heap
    ("definitions", {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}, "0"),  # the user tunes malloc: left alone
])
def test_the_mmap_threshold_stays_fixed_in_dagster_processes(mode: str, env_extra: dict[str, str], mapped: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}, **env_extra}
    done = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], env=env, capture_output=True, text=True, timeout=180, check=True)
    assert done.stdout.split()[-1] == mapped


POOL_PROBE = (
    "import io, sys\n"
    "if sys.argv[1] == 'package-first':\n"
    "    import dicom_assets\n"
    "import pyarrow as pa, pyarrow.parquet as pq\n"
    "buf = io.BytesIO()\n"
    "pq.write_table(pa.table({'x': ['a' * 1000] * 5000}), buf)\n"
    "buf.seek(0)\n"
    "for _ in pq.ParquetFile(buf).iter_batches(batch_size=128):\n"
    "    pass\n"
    "print(pa.mimalloc_memory_pool().max_memory())\n"
)


@pytest.mark.parametrize(("order", "on_mimalloc"), [("package-first", False), ("pyarrow-first", True)])
def test_parquet_decoding_allocates_through_malloc_when_the_package_comes_first(order: str, on_mimalloc: bool) -> None:
    """The package sets Arrow's pool before pyarrow starts; a pool set later misses Parquet's own buffers."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", POOL_PROBE, order], env=env, capture_output=True, text=True, timeout=180, check=True)
    assert (int(done.stdout.split()[-1]) > 0) is on_mimalloc



JEMALLOC_PROBE = (
    "import os, tempfile\n"
    "import dicom_assets\n"
    # stats_print: deltalake's jemalloc prints the options it runs with when the process exits.
    "os.environ['_RJEM_MALLOC_CONF'] += ',stats_print:true,stats_print_opts:mdablxe'\n"
    "import deltalake, pyarrow as pa\n"
    "deltalake.write_deltalake(tempfile.mkdtemp(), pa.table({'a': [1, 2]}))\n"
)


@pytest.mark.parametrize(("given", "decay"), [(None, "0"), ("dirty_decay_ms:250", "250")], ids=["package-default", "user-choice-kept"])
def test_delta_rs_gives_freed_pages_back_at_once_unless_the_user_tuned_it(given: str | None, decay: str) -> None:
    """delta-rs's bundled jemalloc reads ``_RJEM_MALLOC_CONF``; the package sets it before deltalake loads."""
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    if given is not None:
        env["_RJEM_MALLOC_CONF"] = given
    done = subprocess.run([sys.executable, "-c", JEMALLOC_PROBE], env=env, capture_output=True, text=True, timeout=180, check=True)
    # jemalloc's own report, not our variable, says which options it runs with (its default is 10 s).
    assert f"opt.dirty_decay_ms: {decay} " in done.stderr
    if given is None:
        assert "opt.muzzy_decay_ms: 0 " in done.stderr
