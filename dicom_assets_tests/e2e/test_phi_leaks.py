"""No PHI outside the tables (SPEC §6): logs, event log, failure records and the UI's answers are clean.

The small sample plus a corpus subset (character-set files with non-Latin
names, de-identification test data, broken files) is run twice on a real
instance: once with ``dicom-assets run`` (stdout/stderr captured), once
launched through the UI's GraphQL API on a ``dagster dev`` bound to
127.0.0.1. Then every patient name, birth date and patient id found in the
dropped files (read independently with pydicom, ZIP members included) is
searched for in:

* the CLI's stdout/stderr and ``dagster dev``'s output (daemon, code server,
  run worker);
* every file under ``DAGSTER_HOME`` (the SQLite event log and run storage,
  captured step logs) and every event record of every run, serialised;
* ``.error.json`` records and the ``dicom_failures`` table;
* GraphQL answers: asset nodes with their materialisations' metadata, runs,
  every run's event log (messages, metadata, errors), asset check evaluations.

SPEC §6 allows paths in logs ("beyond counts, UIDs and paths"), and the
sample names its folders after patient ids, so absolute paths under the lake
are cut out of the text before searching. Values skipped as too unspecific
to search for (they would match counts, sizes or ordinary words): ids and
name parts shorter than 4 characters (2 for non-ASCII names, e.g. CJK family
names), numeric ids shorter than 6 digits, birth dates shorter than 8
characters, and placeholder words (see ``COMMON``). A value matches only as a word of
its own (not inside a longer word), case-insensitively, raw or JSON-escaped.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import dagster as dg
import pydicom
import pytest

from dicom_assets.defs.metadata import MASK
from dicom_assets.defs.partitions import today_key
from dicom_assets.lake import delta_read
from dicom_assets.lake.paths import LakePaths
from dicom_assets.sample import generate_sample
from dicom_assets_tests.conftest import CORPUS
from dicom_assets_tests.dagster.devserver import IN_PROCESS, dagster_dev, make_home, wait_for_runs

pytestmark = pytest.mark.xdist_group("dagster_dev")

PROJECT = Path(__file__).resolve().parents[2]
DAY = today_key()
CORPUS_DIRS = ["pydicom/test_files", "pydicom/charset_files", "deid-data", "generated-invalid"]
CORPUS_MAX_BYTES = 1_000_000
#: Placeholder values that are not identifying and would match ordinary text.
COMMON = {
    "anonymous", "anonymized", "anon", "unknown", "none", "null", "test", "patient", "phantom", "name",
    "female", "male", "other", "removed", "dicom", "image", "study", "series", "first", "last", "middle",
}

METADATA = """
fragment md on MetadataEntry {
  label description
  ... on TextMetadataEntry { text }
  ... on MarkdownMetadataEntry { mdStr }
  ... on JsonMetadataEntry { jsonString }
  ... on PathMetadataEntry { path }
  ... on UrlMetadataEntry { url }
  ... on TableSchemaMetadataEntry { schema { columns { name type description } } }
}
"""
ASSETS_QUERY = METADATA + """
{ assetNodes(loadMaterializations: true) {
    assetKey { path } description isPartitioned partitionKeys
    assetMaterializations(limit: 50) { runId partition message description label metadataEntries { ...md } }
    assetChecksOrError { ... on AssetChecks { checks { name description
      executionForLatestMaterialization { status evaluation { description metadataEntries { ...md } } } } } }
} }
"""
RUNS_QUERY = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"
LOGS_QUERY = METADATA + """
query Logs($runId: ID!) { logsForRun(runId: $runId, limit: 100000) {
  ... on EventConnection { events {
    __typename
    ... on MessageEvent { message stepKey level }
    ... on DisplayableEvent { label description metadataEntries { ...md } }
    ... on ErrorEvent { error { message className stack cause { message stack } } }
    ... on ExecutionStepFailureEvent { failureMetadata { label description metadataEntries { ...md } } }
    ... on AssetCheckEvaluationEvent { evaluation { description metadataEntries { ...md } } }
  } }
  ... on PythonError { message }
} }
"""


def _dicom_blobs(path: Path, depth: int = 0) -> list[bytes]:
    """The bytes of ``path`` or, for a ZIP, of every member (nested ZIPs too)."""
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)) or depth > 3:
        return [data]
    out = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                try:
                    member = zf.read(info)
                except Exception:  # a corrupt member: nothing to read PHI from
                    continue
                tmp = path.parent / f".phi-{depth}-{abs(hash(info.filename))}"
                tmp.write_bytes(member)
                try:
                    out.extend(_dicom_blobs(tmp, depth + 1))
                finally:
                    tmp.unlink()
    except zipfile.BadZipFile:
        return [data]
    return out


def _name_values(pn: Any) -> set[str]:
    text = str(pn)
    values = {text} | {g for g in text.split("=") if g}
    for group in text.split("="):
        values |= {part for part in group.split("^") if part}
        values.add(" ".join(p for p in group.split("^") if p))
    return values


def _specific(value: str) -> bool:
    v = value.strip()
    if not v or v.lower() in COMMON or len(set(v)) == 1:
        return False
    if v.isdigit():
        return len(v) >= 6
    return len(v) >= (2 if not v.isascii() else 4)


def phi_values(files: list[Path]) -> dict[str, set[str]]:
    """PatientName (and its parts), PatientBirthDate, PatientID, other patient ids, by plain pydicom."""
    found: dict[str, set[str]] = {"name": set(), "birth_date": set(), "id": set()}
    for p in files:
        for blob in _dicom_blobs(p):
            try:
                ds = pydicom.dcmread(io.BytesIO(blob), force=True, stop_before_pixels=True)
                name, birth, pid = ds.get("PatientName"), ds.get("PatientBirthDate"), ds.get("PatientID")
                others = ds.get("OtherPatientIDs")
                seq = ds.get("OtherPatientIDsSequence") or []
                other_ids = [str(x) for x in (others if isinstance(others, (list, pydicom.multival.MultiValue)) else [others])]
                other_ids += [str(item.get("PatientID", "")) for item in seq]
            except Exception:  # unreadable as DICOM: it carries no PHI we could name
                continue
            if name:
                found["name"] |= _name_values(name)
            if birth:
                b = str(birth).strip()
                found["birth_date"] |= {b} | ({f"{b[:4]}-{b[4:6]}-{b[6:8]}"} if len(b) == 8 and b.isdigit() else set())
            for i in [str(pid) if pid else "", *other_ids]:
                if i and i != "None":
                    found["id"].add(i.strip())
    out = {k: {v for v in vs if _specific(v)} for k, vs in found.items()}
    out["birth_date"] = {v for v in out["birth_date"] if len(v) >= 8}
    return out


class Scanner:
    """Finds PHI values in text, after cutting out absolute paths under the given roots."""

    def __init__(self, values: dict[str, set[str]], roots: list[Path]) -> None:
        self.values = values
        stop = r"[^\s\"'|,;)\]}>]*"
        self.paths = re.compile("|".join(re.escape(str(r)) + stop for r in roots))
        self.hits: list[str] = []

        # A value counts where it stands as a word of its own ("ANNA" is not in "referringPhysicianName").
        self.forms: dict[str, tuple[str, str]] = {}
        for kind, vals in values.items():
            for v in vals:
                for form in (v, json.dumps(v)[1:-1]):
                    self.forms.setdefault(form.casefold(), (kind, v))
        alternatives = "|".join(re.escape(f) for f in sorted(self.forms, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I)

    def scan(self, where: str, text: str) -> None:
        text = self.paths.sub("<path>", text)
        seen: set[str] = set()
        for m in self.pattern.finditer(text):
            kind, v = self.forms.get(m.group(0).casefold(), ("?", m.group(0)))
            if v not in seen:
                seen.add(v)
                self.hits.append(f"{kind} {v!r} in {where}: …{text[max(0, m.start() - 80): m.end() + 80]!r}…")


def _corpus_subset(dst: Path) -> None:
    if not (CORPUS / "MANIFEST.tsv").exists():
        return
    for d in CORPUS_DIRS:
        for src in sorted((CORPUS / d).rglob("*")):
            if src.is_file() and src.stat().st_size <= CORPUS_MAX_BYTES:
                target = dst / src.relative_to(CORPUS)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    top = tmp_path_factory.mktemp("phi")
    home = make_home(top)
    lake = LakePaths.of(top / "lake")
    generate_sample(lake.root, "small")
    _corpus_subset(lake.ingest_root / "corpus")
    dropped = [p for p in lake.ingest_root.rglob("*") if p.is_file()]
    values = phi_values(dropped)
    texts: dict[str, str] = {}

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_ASSETS_")}
    env.update({"DAGSTER_HOME": str(home), "DAGSTER_TELEMETRY_DISABLED": "1", "DICOM_ASSETS_WORKERS": "2"})
    cli = subprocess.run(
        [sys.executable, "-m", "dicom_assets.cli", "run", "--lake", str(lake.root), "--settle-seconds", "0"],
        env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-4000:]
    texts["cli stdout"], texts["cli stderr"] = cli.stdout, cli.stderr

    # The same partition again, launched from the UI's API (the sensors stay quiet: settle time of ten years).
    dev_env = {"DICOM_ASSETS_LAKE": str(lake.root), "DICOM_ASSETS_SETTLE_SECONDS": str(10 * 365 * 86400)}
    run_config = {**IN_PROCESS, "resources": {"settings": {"config": {"settle_seconds": 0}}}}
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dagster_dev(home, dev_env) as server, dg.DagsterInstance.get() as instance:
            run_id = server.launch(DAY, {"dicom_assets/trigger": "phi-test"}, run_config)
            (record,) = wait_for_runs(instance, [run_id], timeout=600)
            assert record.dagster_run.status.value == "SUCCESS", server.log.read_text()[-3000:]
            answers = {"assets": server.graphql(ASSETS_QUERY), "runs": server.graphql(RUNS_QUERY)}
            run_ids = [r["runId"] for r in answers["runs"]["runsOrError"]["results"]]
            assert len(run_ids) == 2  # the CLI's run and the UI's
            for rid in run_ids:
                answers[f"logs {rid}"] = server.graphql(LOGS_QUERY, {"runId": rid})
                for i, rec in enumerate(instance.all_logs(rid)):
                    texts[f"event record {rid}/{i}"] = dg.serialize_value(rec)
        texts["dagster dev output"] = server.log.read_text(errors="replace")
    finally:
        del os.environ["DAGSTER_HOME"]
    for name, answer in answers.items():
        texts[f"graphql {name}"] = json.dumps(answer, ensure_ascii=False)
    for p in home.rglob("*"):
        if p.is_file():
            texts[f"DAGSTER_HOME/{p.relative_to(home)}"] = p.read_bytes().decode("utf-8", "replace")
    for p in lake.failed_root.rglob("*.error.json"):
        texts[f"error record {p.name}"] = p.read_text()
    fails = delta_read.read(lake.table_uri("dicom_failures"))
    texts["dicom_failures"] = json.dumps(fails.drop_columns(["detectedAt"]).to_pylist(), ensure_ascii=False)
    return {"values": values, "texts": texts, "answers": answers, "lake": lake, "home": home, "fails": fails.num_rows}


def test_no_phi_outside_the_tables(phi_run: dict[str, Any]) -> None:
    """One scenario (two runs), three findings; one test so that parallel workers build it once."""
    values = phi_run["values"]
    assert len(values["name"]) >= 20 and len(values["id"]) >= 20 and len(values["birth_date"]) >= 20, {
        k: len(v) for k, v in values.items()
    }
    assert phi_run["fails"] >= 1  # failure records exist, so their messages are really scanned

    # Positive control: the same scanner finds the values where they belong, in the tables.
    lake: LakePaths = phi_run["lake"]
    rows = delta_read.read(lake.table_uri("dicomimagingmetastore"), columns=["patientName", "patientId", "patientBirthDate"])
    control = Scanner(values, [lake.root])
    control.scan("metastore", json.dumps(rows.to_pylist(), ensure_ascii=False))
    assert {h.split(" ", 1)[0] for h in control.hits} == {"name", "id", "birth_date"} and len(control.hits) >= 40
    print({k: len(v) for k, v in values.items()}, f"{len(phi_run['texts'])} texts scanned")

    # Nothing anywhere else.
    scanner = Scanner(values, [lake.root, phi_run["home"]])
    for where, text in phi_run["texts"].items():
        scanner.scan(where, text)
    assert not scanner.hits, "\n".join(scanner.hits[:20])

    # The metastore preview shown in the UI masks patient names.
    nodes = phi_run["answers"]["assets"]["assetNodes"]
    (meta,) = [n for n in nodes if n["assetKey"]["path"] == ["bronze", "dicomimagingmetastore"]]
    previews = [e["mdStr"] for m in meta["assetMaterializations"] for e in m["metadataEntries"] if e["label"] == "preview"]
    assert len(previews) == 2  # one per run
    for md in previews:
        lines = [ln.strip("|").split("|") for ln in md.splitlines()]
        col = [c.strip() for c in lines[0]].index("patientName")
        cells = [row[col].strip() for row in lines[2:]]
        assert cells and all(c in (MASK, "") for c in cells) and MASK in cells, md


def test_the_ui_lists_every_asset_with_day_partitions(phi_run: dict[str, Any]) -> None:
    """What the web UI shows: the project's assets, each partitioned by ``yyyy/mm/dd``, today materialised."""
    nodes = phi_run["answers"]["assets"]["assetNodes"]
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert {
        "bronze/dicom_files", "bronze/dicomimagingmetastore", "silver/ImagingMetastore", "bronze/ImagingStudy_ndjson",
        "bronze/ImagingStudy", "silver/ImagingStudy", "gold/image_occurrence", "gold/procedure_occurrence",
    } <= keys, keys
    for n in nodes:
        assert n["isPartitioned"], n["assetKey"]
        assert n["partitionKeys"][0] == "2020/01/01" and DAY in n["partitionKeys"], n["assetKey"]
        assert all(re.fullmatch(r"\d{4}/\d{2}/\d{2}", k) for k in n["partitionKeys"])
        assert {m["partition"] for m in n["assetMaterializations"]} == {DAY}, n["assetKey"]


def test_the_web_ui_binds_to_localhost_in_make_and_docs() -> None:
    """``make ui`` and every documented ``dagster dev`` / web server command bind 127.0.0.1."""
    makefile = (PROJECT / "Makefile").read_text()
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no ui target"
    commands = [ln for ln in recipe.group(1).splitlines() if re.search(r"dagster(-webserver)?\s+dev|dagster-webserver|\bdg\s+dev", ln)]
    assert commands, recipe.group(1)
    docs = [p for p in PROJECT.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts]
    for doc in docs:
        # Commands are what the docs tell people to type: the lines of fenced code blocks.
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", doc.read_text(encoding="utf-8"), re.M | re.S):
            commands += [ln for ln in block.splitlines() if re.search(r"dagster\s+dev|dagster-webserver|\bdg\s+dev", ln)]
    for cmd in commands:
        assert re.search(r"(-h|--host)[ =]127\.0\.0\.1\b", cmd), f"binds beyond localhost: {cmd!r}"
