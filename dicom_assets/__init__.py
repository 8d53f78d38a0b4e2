"""dicom_assets: DICOM files → Delta tables (bronze), FHIR R4B ImagingStudy (silver), OMOP (gold)."""

import os as _os
import sys as _sys

# Arrow reads this once, when pyarrow's C++ side first asks for its default
# pool, and Parquet decoding allocates from that pool whatever pyarrow's
# Python-level default says later. Set here, before any of our modules imports
# pyarrow, every Arrow allocation goes through malloc; set after (what
# lake.arrow_memory.use_system_allocator can still do when pyarrow came
# first), Parquet's page buffers stayed on mimalloc, which kept them: reading
# twenty silver files left 145 MB behind, against 1 MB.
if "pyarrow" not in _sys.modules:
    _os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

# delta-rs (deltalake's Rust core) allocates through a jemalloc of its own,
# configured only by this variable, and by default keeps the pages it freed
# for ~10 s. A Delta write every round of silver's merge left ~5 MB each (a
# 100,000-instance day's merge peaked at 643 MiB, 558 with pages given back at
# once); they are given back as soon as they are free. Read when deltalake
# first allocates, so set before it is imported; a value the user set wins.
if "deltalake" not in _sys.modules:
    _os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

__version__ = "0.1.0"
