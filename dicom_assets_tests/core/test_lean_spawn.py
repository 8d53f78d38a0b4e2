"""Pool helpers start without re-importing the parent's main module (the ``dagster`` script, in a UI run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with open(os.environ["IMPORT_LOG"], "a") as log:
        log.write(f"{__name__} {os.getpid()}\\n")

    if __name__ == "__main__":
        from dicom_assets.engines.spawn import LeanSpawnContext
        from dicom_assets.lake.fileops import display_path

        ctx = LeanSpawnContext() if sys.argv[1] == "lean" else get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            pid = pool.submit(os.getpid).result()
            # A function of the package still runs in the helper, found on the parent's sys.path.
            shown = pool.submit(display_path, "scan.dcm").result()
        print(pid, shown)
    """
)


def _run(tmp_path: Path, method: str) -> tuple[int, str, list[str]]:
    script = tmp_path / "main_script.py"
    script.write_text(SCRIPT)
    log = tmp_path / f"{method}.log"
    done = subprocess.run(
        [sys.executable, str(script), method], env={**os.environ, "IMPORT_LOG": str(log)},
        capture_output=True, text=True, timeout=120, check=True,
    )
    pid, shown = done.stdout.split()
    return int(pid), shown, log.read_text().splitlines()


def test_the_helper_does_not_import_the_main_module(tmp_path: Path) -> None:
    pid, shown, imports = _run(tmp_path, "lean")
    assert [line.split()[0] for line in imports] == ["__main__"]
    assert str(pid) not in " ".join(imports)
    assert shown == "scan.dcm"


def test_plain_spawn_does_import_it(tmp_path: Path) -> None:
    """The control: the standard spawn context re-runs the script in the helper as ``__mp_main__``."""
    pid, _shown, imports = _run(tmp_path, "spawn")
    assert f"__mp_main__ {pid}" in imports
