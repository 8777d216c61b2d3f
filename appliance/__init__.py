"""Clinic edge AI appliance: durable DICOM ingest, AI triage and store-and-forward."""

__version__ = "0.1.0"
