"""One model's result on one image as a Comprehensive SR (TID 1500 Measurement Report).

Content tree (``>`` = nesting; relationship types as TID 1500/1501 use them)::

  CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
  > HAS CONCEPT MOD  Language of Content = English (US)             TID 1204
  > HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model
  > HAS CONCEPT MOD  Procedure Reported = (363679005, SCT, "Imaging procedure")
  > CONTAINS CONTAINER Image Library > Image Library Group > IMAGE source (+ modality, size)
  > CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
    >> CONTAINER (125007, DCM, "Measurement Group")                 TID 1501, one per finding
       >>> Tracking Identifier / Tracking Unique Identifier
       >>> Finding (121071, DCM) = (<finding code>, 99EDGEAI, <label>)
       >>> Algorithm Name / Version / Parameters                    TID 4019
       >>> IMAGE Source of Measurement (+ frame number for multi-frame sources)
       >>> NUM (122157, DCM, "Probability"), unit {probability}     TID 300
       >>> NUM (122411, DCM, "Threshold Value"), unit {probability}  the operating point
       >>> CODE <finding> = (10828004, SCT, "Positive") | (260385009, SCT, "Negative")
    >> or, when the model abstained, one group whose evaluation is
       CODE (ABSTAINED, 99EDGEAI) = (<abstention code>, 99EDGEAI) plus a TEXT with the reason
  > CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
    >> TEXT (121106, DCM, "Comment") = "AI assist — not a diagnosis"
    >> TEXT (SRCNOTCOPIED, 99EDGEAI) = "Patient's Age left out: ..."   one per source attribute
       this document does not carry as the source sent it (see results/conform.py)

Findings have no standard codes (the models define them), so they use the local coding scheme
``99EDGEAI``, declared in the Coding Scheme Identification Sequence.  The document is written
UNVERIFIED and PRELIMINARY: no clinician has looked at it, and the AI never has the last word.
"""
from __future__ import annotations

from typing import Optional

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..analyze.result import AI_NOTICE, AnalysisResult, FindingResult
from .common import (CHARACTER_SET, MANUFACTURER, MODEL_NAME, derived_uid, device_uid, frame_number,
                     lo, notices, software_versions, source_copy, sr_keywords)

LOCAL_SCHEME = "99EDGEAI"
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
ABSTAINED = hd.sr.CodedConcept("ABSTAINED", LOCAL_SCHEME, "AI analysis abstained")
ABSTENTION_REASON = hd.sr.CodedConcept("ABSTAINREASON", LOCAL_SCHEME, "Abstention reason")
SOURCE_VALUE_NOTE = hd.sr.CodedConcept("SRCNOTCOPIED", LOCAL_SCHEME, "Source value not copied as sent")
RELATION = hd.sr.RelationshipTypeValues


def _coding_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="Clinic Edge Appliance AI findings",
        responsible_organization=MANUFACTURER)


def finding_concept(finding: FindingResult) -> hd.sr.CodedConcept:
    """The finding as a coded concept in the local scheme (the model package names it)."""
    return hd.sr.CodedConcept(finding.code, LOCAL_SCHEME, lo(finding.label or finding.code))


def _abstention_concept(code: str) -> hd.sr.CodedConcept:
    # "NOT_APPLICABLE_MODALITY" -> "Not applicable modality": readable in any SR viewer.
    return hd.sr.CodedConcept(code, LOCAL_SCHEME, lo(code.replace("_", " ").capitalize()))


def _observation_context(result: AnalysisResult, device: str) -> hd.sr.ObservationContext:
    # The observer is this box, not a person: nobody has reviewed the result yet.
    attributes = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device, name=lo(f"{MODEL_NAME} AI"), manufacturer_name=MANUFACTURER, model_name=MODEL_NAME)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=attributes))


def _algorithm(result: AnalysisResult, threshold: Optional[float] = None) -> hd.sr.AlgorithmIdentification:
    parameters = [f"backend={result.backend}", f"precision={result.precision}"]
    if threshold is not None:
        parameters.append(f"operating point threshold={threshold:.6g}")
    return hd.sr.AlgorithmIdentification(name=lo(result.model), version=lo(result.model_version),
                                          parameters=parameters, manufacturer=MANUFACTURER)


def _source_image(source: Dataset, result: AnalysisResult) -> hd.sr.SourceImageForMeasurementGroup:
    frame = frame_number(source, result)
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=[frame] if frame is not None else None)


def _tracking(sop_instance_uid: str, key: str, label: str) -> hd.sr.TrackingIdentifier:
    # Derived from the SR's own UID: a re-run after a crash produces an identical document.
    return hd.sr.TrackingIdentifier(uid=derived_uid(sop_instance_uid, key), identifier=lo(label))


def _finding_group(source: Dataset, result: AnalysisResult, finding: FindingResult,
                   sop_instance_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = finding_concept(finding)
    probability = hd.sr.Measurement(name=codes.DCM.Probability, value=float(finding.probability),
                                    unit=PROBABILITY_UNIT)
    threshold = hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(finding.threshold),
                                  unit=PROBABILITY_UNIT)
    state = codes.SCT.Positive if finding.positive else codes.SCT.Negative
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, finding.code, f"{result.model} {finding.code}"),
        finding_type=concept,
        algorithm_id=_algorithm(result, finding.threshold),
        measurements=[probability, threshold],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=state)],
        source_images=[_source_image(source, result)],
    )


def _abstention_group(source: Dataset, result: AnalysisResult,
                      sop_instance_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    abstention = result.abstention
    evaluations = []
    if abstention is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=ABSTAINED, value=_abstention_concept(abstention.code)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "abstention",
                                      f"{result.model} {'not analyzed' if abstention else 'no findings'}"),
        algorithm_id=_algorithm(result),
        qualitative_evaluations=evaluations or None,
        source_images=[_source_image(source, result)],
    )
    if abstention is not None and abstention.reason:
        # The reason is free text (it names the offending value), so it cannot be a code.
        # TID 1501 is extensible; a TEXT evaluation sits next to the coded one.
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=ABSTENTION_REASON, value=abstention.reason, relationship_type=RELATION.CONTAINS))
    return group


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 with the descriptors every image has.

    highdicom's ImageLibrary insists on the full projection/cross-sectional descriptors
    (ImagerPixelSpacing, orientation, ...) that real CR and ultrasound files often lack, so
    the library is assembled here from its content items, with only what the source carries.
    """
    image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=RELATION.CONTAINS)
    descriptors = hd.sr.ContentSequence()
    modality = _modality_codes().get(str(source.get("Modality", "")).upper())
    if modality is not None:
        descriptors.append(hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality,
                                                 relationship_type=RELATION.HAS_ACQ_CONTEXT))
    pixels = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        if source.get(keyword):
            descriptors.append(hd.sr.NumContentItem(name=name, value=int(source.get(keyword)), unit=pixels,
                                                    relationship_type=RELATION.HAS_ACQ_CONTEXT))
    if descriptors:
        image.ContentSequence = descriptors
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RELATION.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RELATION.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


_MODALITIES: dict[str, hd.sr.CodedConcept] = {}


def _modality_codes() -> dict[str, hd.sr.CodedConcept]:
    # CID 29 "Acquisition Modality", keyed by the DICOM Modality value ("CR", "US", ...).
    if not _MODALITIES:
        for keyword in codes.cid29.dir():
            code = getattr(codes.cid29, keyword)
            _MODALITIES[code.value] = hd.sr.CodedConcept.from_code(code)
    return _MODALITIES


def _notice_container(result: AnalysisResult, source_notes: list[str]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=RELATION.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=RELATION.CONTAINS)
         for text in notices(result)]
        # What a reader would otherwise take for the source's own value, or miss without knowing.
        + [hd.sr.TextContentItem(name=SOURCE_VALUE_NOTE, value=text, relationship_type=RELATION.CONTAINS)
           for text in source_notes])
    return container


def build_ai_sr(source: Dataset, result: AnalysisResult, *, sop_instance_uid: str, series_instance_uid: str,
                series_number: int = 990, instance_number: int = 1) -> Dataset:
    """A Comprehensive SR (TID 1500) of ``result`` in the same study as ``source``.

    The UIDs come from the caller, who derives them deterministically, so rebuilding after a
    crash replaces the earlier object instead of adding a duplicate to the study.
    """
    copied = source_copy(source)
    meta = copied.meta
    device = device_uid()
    if result.abstention is not None or not result.findings:
        groups = [_abstention_group(meta, result, sop_instance_uid)]
    else:
        groups = [_finding_group(meta, result, f, sop_instance_uid) for f in result.findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result, device),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    root = report[0]
    # TID 1500 order: the image library precedes "Imaging Measurements"; the root-level
    # qualitative evaluations (our notice) follow it.
    root.ContentSequence.insert(len(root.ContentSequence) - 1, _image_library(meta))
    root.ContentSequence.append(_notice_container(result, copied.notes(sr_keywords(meta))))
    return hd.sr.ComprehensiveSR(
        evidence=[meta],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(result),
        series_description=lo(f"{AI_NOTICE} ({result.model} {result.model_version})"),
        is_complete=True,   # the document holds everything this model said about this image
        is_final=False,     # PRELIMINARY: a clinician's review is the final word, not this
        is_verified=False,  # UNVERIFIED: no accountable person has signed it
        coding_schemes=[_coding_scheme()],
        specific_character_set=CHARACTER_SET,
    )
