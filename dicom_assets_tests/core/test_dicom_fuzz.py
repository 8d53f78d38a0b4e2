"""Structure-aware fuzzing of the reader with mutated real files (SPEC §6: never a crash, never a hang).

Seeds are the smallest file of every (transfer syntax, modality, validity)
group of the shared corpus (MANIFEST.tsv) plus pydicom's bundled test files,
so the run works without the corpus too. Each case applies one to three
mutations — truncate, flip bytes, zero a run, corrupt a length (0, odd,
4 GiB, undefined…), change a VR, turn an element into an undefined-length
one, insert deeply nested sequences (terminated or not), insert item and
delimitation tags, repeat a slice, insert a Specific Character Set — and
reads the result with :func:`extract_batch_arrow` in a batch of two beside an
untouched control file. Every case must give exactly one row or one failure
record with a known error class and no values in the message, the control's
row must be there, and the case must end within the time budget.

Deterministic (``derandomize``): ``FUZZ_CASES`` cases, 3,000 by default;
``FUZZ_CASES=20000`` for a longer campaign, ``FUZZ_SEED`` for another
sequence of cases.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files, get_testdata_file

from dicom_assets.dicom.budget import ReadLimits
from dicom_assets.dicom.extract import extract_batch_arrow
from dicom_assets.dicom.records import ExtractTask
from dicom_assets_tests.conftest import CORPUS, read_manifest

CASES = int(os.environ.get("FUZZ_CASES", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
#: Per-file budget for the fuzz run; a case may overrun it only by scheduling noise.
TIMEOUT = 2.0
SLACK = 1.5
MAX_SEED_BYTES = 64_000
NOW = datetime(2024, 1, 2, tzinfo=UTC)
KNOWN_ERRORS = {"NotDicom", "Truncated", "InvalidElement", "MissingUid", "TooLarge", "TooDeep", "Timeout"}
PYDICOM_SEEDS = (
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "image_dfl.dcm",
    "no_meta.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
    "reportsi.dcm",
)
PYDICOM_CHARSET_SEEDS = ("chrH31.dcm", "chrSQEncoding.dcm", "chrJapMulti.dcm")
VRS = [
    v.encode()
    for v in "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
]
LONG_VRS = {v.encode() for v in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()}
#: Explicit-VR headers (a VR at bytes 4-5) and implicit-VR tags of common groups or items.
HEADER = re.compile(
    rb"(?=[\x00-\xff]{4}(?:" + b"|".join(VRS) + rb"))"
    rb"|(?=(?:[\x02\x08\x09\x10\x18\x19\x20\x28\x29\x32\x40\x43]\x00|\xfe\xff)[\x00-\xff]{6})"
)
LENGTHS = [0, 1, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF]
CHARSETS = [b"ISO_IR 192", b"ISO 2022 IR 87\\ISO 2022 IR 100", b"GB18030", b"ISO_IR 13", b"BOGUS", b"\\\\\\"]
ITEM, ITEM_DELIM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


@functools.cache
def seeds() -> tuple[tuple[str, bytes, frozenset[str]], ...]:
    """(name, bytes, patient-name strings that must never appear in a message) per seed."""
    paths: list[tuple[str, Path]] = [(n, Path(get_testdata_file(n, download=False))) for n in PYDICOM_SEEDS]
    paths += [(n, Path(get_charset_files(n)[0])) for n in PYDICOM_CHARSET_SEEDS]
    if (CORPUS / "MANIFEST.tsv").exists():
        smallest: dict[tuple[str, str, str], tuple[int, str]] = {}
        for rec in read_manifest(CORPUS):
            if "!" in rec["path"]:
                continue
            size = (CORPUS / rec["path"]).stat().st_size
            key = (rec["transfer_syntax_uid"], rec["modality"], rec["valid_dicom"])
            if 0 < size <= MAX_SEED_BYTES and (key not in smallest or (size, rec["path"]) < smallest[key]):
                smallest[key] = (size, rec["path"])
        paths += [(p, CORPUS / p) for _, p in sorted(smallest.values())]
    out = []
    for name, path in paths:
        data = path.read_bytes()
        out.append((name, data, _names(data)))
    return tuple(out)


def _names(data: bytes) -> frozenset[str]:
    """Patient names as pydicom reads them (the independent reader), for the no-PHI check."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
            name = str(ds.get("PatientName", "") or "")
    except Exception:  # noqa: BLE001 - invalid seeds have no names to protect
        return frozenset()
    return frozenset(p for p in re.split(r"[\^=\\ ]", name) if len(p) >= 4)


@functools.cache
def headers(index: int) -> tuple[int, ...]:
    data = seeds()[index][1]
    found = tuple(m.start() for m in HEADER.finditer(data))
    return found or (0,)


# --------------------------------------------------------------------------- mutations
# Each mutation is (kind, a, b, c) with integers drawn by hypothesis; ``at``
# picks a header offset of the seed (shifted by earlier insertions: fine).


def _pick(index: int, k: int, data: bytearray) -> int:
    hs = headers(index)
    return min(hs[k % len(hs)], max(len(data) - 1, 0))


def _tag(group_elem: int, length: int) -> bytes:
    return struct.pack("<HHL", group_elem >> 16, group_elem & 0xFFFF, length)


def m_truncate(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    return data[: a % (len(data) + 1)]


def m_flip(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    if data:
        p = _pick(index, a, data) + b % 12
        for i in range(p, min(p + 1 + c % 4, len(data))):
            data[i] ^= 1 + (b * 7 + i) % 255
    return data


def m_zeros(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    n = 1 + b % 64
    data[p : p + n] = bytes(len(data[p : p + n]))
    return data


def m_length(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    vr = bytes(data[p + 4 : p + 6])
    value = LENGTHS[b % len(LENGTHS)] if c % 3 else (len(data) - p + b % 7 - 3) & 0xFFFFFFFF
    if vr in LONG_VRS and len(data) >= p + 12:
        data[p + 8 : p + 12] = struct.pack("<L", value)
    elif vr in VRS and len(data) >= p + 8:
        data[p + 6 : p + 8] = struct.pack("<H", value & 0xFFFF)
    elif len(data) >= p + 8:
        data[p + 4 : p + 8] = struct.pack("<L", value)
    return data


def m_vr(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    choices = VRS + [b"ZZ", b"\x00\x00", b"sq", b"\xff\xff"]
    data[p + 4 : p + 6] = choices[b % len(choices)]
    return data


def m_undefined(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    vr = [b"SQ", b"UN", b"OB", b"OW", b"UT", b"LO"][b % 6]
    if bytes(data[p + 4 : p + 6]) in LONG_VRS:
        data[p + 4 : p + 12] = vr + b"\x00\x00\xff\xff\xff\xff"
    else:
        data[p + 4 : p + 8] = vr + b"\x00\x00" + b"\xff\xff\xff\xff"
    return data


def m_nest(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    depth = 1 + b % 300
    implicit = c % 2 == 1
    sq = _tag(0x0040A730, 0xFFFFFFFF) if implicit else struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    opened = (sq + _tag(ITEM, 0xFFFFFFFF)) * depth
    closed = (_tag(ITEM_DELIM, 0) + _tag(SEQ_DELIM, 0)) * (depth if c % 3 else depth // 2)
    data[p:p] = opened + closed
    return data


def m_delims(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    tag = (ITEM, ITEM_DELIM, SEQ_DELIM)[b % 3]
    length = (0, 0xFFFFFFFF, 8, 0xFFFFFFF0)[c % 4]
    data[p:p] = _tag(tag, length) * (1 + c % 5)
    return data


def m_repeat(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    chunk = bytes(data[p : p + 8 + b % 120])
    data[p:p] = chunk * (1 + c % 200)
    return data


def m_charset(data: bytearray, index: int, a: int, b: int, c: int) -> bytearray:
    p = _pick(index, a, data)
    value = CHARSETS[b % len(CHARSETS)]
    value += b" " * (len(value) % 2)
    el = struct.pack("<HH", 0x0008, 0x0005) + (
        struct.pack("<L", len(value)) if c % 2 else b"CS" + struct.pack("<H", len(value))
    )
    data[p:p] = el + value
    return data


MUTATIONS: dict[str, Callable[[bytearray, int, int, int, int], bytearray]] = {
    "truncate": m_truncate,
    "flip": m_flip,
    "zeros": m_zeros,
    "length": m_length,
    "vr": m_vr,
    "undefined": m_undefined,
    "nest": m_nest,
    "delims": m_delims,
    "repeat": m_repeat,
    "charset": m_charset,
}

mutation = st.tuples(
    st.sampled_from(sorted(MUTATIONS)),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 16),
    st.integers(0, 1 << 16),
)


def mutate(index: int, plan: list[tuple[str, int, int, int]]) -> bytes:
    data = bytearray(seeds()[index][1])
    for kind, a, b, c in plan:
        data = MUTATIONS[kind](data, index, a, b, c)
    return bytes(data)


# --------------------------------------------------------------------------- the run


def _task(path: Path) -> ExtractTask:
    return ExtractTask(str(path), str(path), str(path), "fuzz", "2024/01/02", 1_700_000_000.0)


def check_case(work: Path, index: int, plan: list[tuple[str, int, int, int]], stats: Counter[str]) -> None:
    """One case: a mutant and the control in one batch; every invariant asserted."""
    data = mutate(index, plan)
    mutant = work / "mutant.dcm"
    mutant.write_bytes(data)
    control = work / "control.dcm"
    t = time.monotonic()
    rows_t, fails_t = extract_batch_arrow(
        [_task(mutant), _task(control)], now=NOW, limits=ReadLimits(timeout_seconds=TIMEOUT)
    )
    elapsed = time.monotonic() - t
    rows, fails = rows_t.to_pylist(), fails_t.to_pylist()
    assert elapsed < TIMEOUT + SLACK, f"case took {elapsed:.1f}s: {seeds()[index][0]} {plan}"
    assert [r["filePath"] for r in rows if r["filePath"] == str(control)], "the control file lost its row"
    outcomes = [r for r in rows if r["filePath"] == str(mutant)] + [f for f in fails if f["filePath"] == str(mutant)]
    assert len(outcomes) == 1 and len(rows) + len(fails) == 2, (seeds()[index][0], plan)
    if fails:
        (f,) = fails
        assert f["errorClass"] in KNOWN_ERRORS, f"{f['errorClass']}: {f['message']} ({seeds()[index][0]} {plan})"
        assert f["stage"] == "extract" and f["fileSize"] == len(data)
        for name in seeds()[index][2]:
            assert name not in f["message"], "a patient name leaked into a failure message"
        stats[f["errorClass"]] += 1
    else:
        row = next(r for r in rows if r["filePath"] == str(mutant))
        assert row["sopInstanceUid"] and row["sopClassUid"]
        assert isinstance(json.loads(row["metadata_string"]), dict)
        stats["row"] += 1


def test_mutated_real_files_give_a_row_or_a_failure_within_budget(tmp_path: Path) -> None:
    all_seeds = seeds()
    (tmp_path / "control.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm", download=False)).read_bytes())
    stats: Counter[str] = Counter()

    @seed(SEED)
    @settings(
        max_examples=CASES,
        derandomize=SEED == 0,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(index=st.integers(0, len(all_seeds) - 1), plan=st.lists(mutation, min_size=1, max_size=3))
    def run(index: int, plan: list[tuple[str, int, int, int]]) -> None:
        stats["cases"] += 1
        check_case(tmp_path, index, plan, stats)

    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    print(f"\nfuzz: {stats['cases']} cases from {len(all_seeds)} seeds in {seconds:.1f}s: {dict(stats)}")
    # Hypothesis may stop a little early; most cases must have run, and both outcomes must occur.
    assert stats["cases"] >= CASES * 0.9
    assert stats["row"] > 0 and stats["Truncated"] > 0 and stats["TooDeep"] > 0


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_every_mutation_changes_the_seed(kind: str) -> None:
    """A mutation that silently did nothing would make the fuzz run weaker than it claims."""
    index = next(i for i, s in enumerate(seeds()) if s[0] == "CT_small.dcm")
    original = seeds()[index][1]
    changed = sum(mutate(index, [(kind, a, 3 + a, 1 + a)]) != original for a in range(1, 40, 3))
    assert changed >= 10


#: Cases the fuzz run found, each a reader bug fixed since: (seed, plan, what went wrong).
FOUND = [
    ("chrSQEncoding.dcm", [("charset", 340, 1, 0)], "pydicom raised IndexError re-encoding an ISO 2022 PN"),
    ("CT_small.dcm", [("charset", 1, 0, 0), ("vr", 1, 474, 0)], "(0008,0005) read as PN: unhashable dict"),
    ("pydicom/test_files/dicomdirtests/98892003/MR1/5641", [("vr", 299, 13892, 0)], "(0008,0005) as numbers"),
    ("pydicom/test_files/dicomdirtests/98892003/MR1/5641", [("vr", 149, 6944, 0)], "a promoted column as numbers"),
    (
        "pydicom/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000",
        [("undefined", 334, 0, 0)],
        "struct.error peeking an item tag 4-7 bytes before the end",
    ),
]


@pytest.mark.parametrize(("name", "plan", "bug"), FOUND, ids=[f[2] for f in FOUND])
def test_fuzz_findings_stay_fixed(tmp_path: Path, name: str, plan: list[tuple[str, int, int, int]], bug: str) -> None:
    index = next((i for i, s in enumerate(seeds()) if s[0] == name), None)
    if index is None:
        pytest.skip(f"seed {name} needs the shared corpus")
    (tmp_path / "control.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm", download=False)).read_bytes())
    check_case(tmp_path, index, plan, Counter())
