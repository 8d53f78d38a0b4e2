"""validate_imaging_study rejects broken resources with the id and the failing path (SPEC §3.4)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from dicom_assets.fhir import imaging_study_errors, validate_imaging_study

STUDY = "1.2.826.0.1.3680043.2.1125.7"
ID = hashlib.sha256(f"ns/ImagingStudy/{STUDY}".encode()).hexdigest()


def valid() -> dict[str, Any]:
    """A minimal valid resource, hand-written from the FHIR R4B ImagingStudy definition."""
    return {
        "resourceType": "ImagingStudy",
        "id": ID,
        "meta": {"lastUpdated": "2024-01-02T03:04:05.000000Z"},
        "contained": [{"resourceType": "Patient", "id": "patient", "gender": "male"}],
        "identifier": [{"use": "official", "system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}],
        "status": "available",
        "subject": {"reference": "#patient", "type": "Patient"},
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
        "series": [
            {
                "uid": f"{STUDY}.1",
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                "numberOfInstances": 1,
                "bodySite": {"system": "http://snomed.info/sct", "code": "69536005", "display": "Head"},
                "instance": [
                    {
                        "uid": f"{STUDY}.1.1",
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"},
                    }
                ],
            }
        ],
    }


def test_valid_resource_passes() -> None:
    validate_imaging_study(valid(), namespace="ns")
    assert imaging_study_errors(valid()) == []


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(resource: dict[str, Any]) -> None:
        target = resource
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (_set(["contained", 0, "gender"], "M"), "gender"),
        (_set(["status"], KeyError), "status"),
        (_set(["status"], "done"), "status"),
        (_set(["numberOfInstances"], 2), "numberOfInstances"),
        (_set(["numberOfSeries"], 3), "numberOfSeries"),
        (_set(["series", 0, "numberOfInstances"], 5), "series[0].numberOfInstances"),
        (_set(["series", 0, "bodySite", "code"], "123"), "series[0].bodySite.code"),
        (_set(["series", 0, "modality", "system"], "http://example.org"), "series[0].modality.system"),
        (_set(["modality", 0, "system"], "http://example.org"), "modality[0].system"),
        (
            _set(["series", 0, "modality"], {"system": "http://dicom.nema.org/resources/ontology/DCM"}),
            "series[0].modality.code",
        ),
        (_set(["series", 0, "instance", 0, "sopClass", "code"], "1.2.3"), "series[0].instance[0].sopClass.code"),
        (_set(["started"], "1974-07-10T07:10:24"), "started"),  # time without zone
        (_set(["identifier"], []), "identifier"),
        (_set(["subject", "reference"], "Patient/123"), "subject.reference"),
        (_set(["id"], "not-a-sha"), "id"),
        (_set(["series", 0, "laterality"], {"system": "http://snomed.info/sct", "code": "66459002"}), "laterality"),
    ],
)
def test_broken_resource_is_rejected_naming_id_and_path(mutate: Callable[[dict[str, Any]], None], path: str) -> None:
    resource = copy.deepcopy(valid())
    mutate(resource)
    with pytest.raises(ValueError) as error:
        validate_imaging_study(resource)
    message = str(error.value)
    assert message.startswith(f"ImagingStudy {resource.get('id')}:")
    assert path in message


def test_identity_rule_checked_when_namespace_given() -> None:
    with pytest.raises(ValueError, match="id: not the identity"):
        validate_imaging_study(valid(), namespace="other")


def test_uncoded_body_site_with_display_is_valid_but_empty_coding_is_not() -> None:
    resource = valid()
    resource["series"][0]["bodySite"] = {"display": "SOMEWHERE ODD"}
    validate_imaging_study(resource)
    resource["series"][0]["bodySite"] = {"system": "http://snomed.info/sct"}
    with pytest.raises(ValueError, match=r"series\[0\]\.bodySite"):
        validate_imaging_study(resource)


def test_messages_carry_no_patient_values() -> None:
    resource = valid()
    resource["contained"][0]["name"] = [{"family": "Secretname"}]
    resource["contained"][0]["birthDate"] = "not a date"
    with pytest.raises(ValueError) as error:
        validate_imaging_study(resource)
    assert "Secretname" not in str(error.value) and "not a date" not in str(error.value)
    assert "birthDate" in str(error.value)
