"""Pure OMOP mapping (SPEC §3.5): MI-CDM ``image_occurrence`` and ``procedure_occurrence`` rows,
stable id maps and concept resolution. Imports no Dagster or Spark; the assets call these functions.

Typical use for one study (the caller persists id maps and writes rows through ``lake/``)::

    keys = keys_for_study(study, instances_by_series)
    new_series = assign_ids(series_map, keys.image_occurrence.values())   # likewise person, procedure
    ids = IdLookup(image_occurrence={**series_map, **new_series}, person=..., procedure_occurrence=...)
    rows = image_occurrence_rows(study, instances_by_series, ids=ids, concepts=resolver,
                                 dicomweb_base_url=..., lake_root=..., modified=now)
"""

from __future__ import annotations

from dicom_assets.omop.concepts import (
    NO_MATCHING_CONCEPT,
    BodyPartRow,
    ConceptResolver,
    ModalityRow,
    Vocabulary,
    read_body_part_map,
    read_modality_map,
)
from dicom_assets.omop.idmap import (
    IdLookup,
    anonymous_person_key,
    assign_ids,
    find_conflicts,
    id_rows,
    person_key,
    series_key,
    study_key,
)
from dicom_assets.omop.mapping import (
    EHR_TYPE_CONCEPT_ID,
    StudyKeys,
    image_occurrence_rows,
    keys_for_study,
    procedure_occurrence_rows,
    series_folder,
    validate_rows,
    wadors_uri,
)

__all__ = [
    "EHR_TYPE_CONCEPT_ID",
    "NO_MATCHING_CONCEPT",
    "BodyPartRow",
    "ConceptResolver",
    "IdLookup",
    "ModalityRow",
    "StudyKeys",
    "Vocabulary",
    "anonymous_person_key",
    "assign_ids",
    "find_conflicts",
    "id_rows",
    "image_occurrence_rows",
    "keys_for_study",
    "person_key",
    "procedure_occurrence_rows",
    "read_body_part_map",
    "read_modality_map",
    "series_folder",
    "series_key",
    "study_key",
    "validate_rows",
    "wadors_uri",
]
