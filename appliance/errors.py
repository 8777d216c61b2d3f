"""The appliance's one error hierarchy.

Foreign exceptions (pydicom, sqlite3, OSError, network libraries) are translated once, at the
boundary where they happen, into one of these (``raise StoreError(...) from exc``).
"""
from __future__ import annotations


class ApplianceError(Exception):
    """Base class of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """The configuration is invalid; the message names the key and the problem."""


class StoreError(ApplianceError):
    """An instance could not be stored durably."""


class OutOfSpaceError(StoreError):
    """Free space under the data directory is below the configured floor."""


class InvalidDatasetError(StoreError):
    """A dataset cannot be parsed or lacks the identifiers needed to store it."""


class ImportPathError(ApplianceError):
    """An import source path does not exist or cannot be read."""


class ManifestError(ApplianceError):
    """A model package's manifest is invalid or does not match its files."""


class DecodeError(ApplianceError):
    """Pixel data cannot be decoded into an image."""


class InferenceError(ApplianceError):
    """A model could not be loaded or run."""


class BackendUnavailableError(InferenceError):
    """The requested inference backend is not available on this machine."""


class QuantizeRefusedError(ApplianceError):
    """The INT8 model lost too much accuracy against FP32 and was not written."""


class SendError(ApplianceError):
    """A transfer to a destination failed (network or peer)."""


# -- the results stage (appliance.results) ----------------------------------------------------

class StaleResultError(ApplianceError):
    """The image a result was computed on was replaced before its AI objects were built."""

    code = "source_replaced"


class InvalidSourceUID(ApplianceError, ValueError):
    """A source UID the AI objects must reference is not a valid UID (also a ValueError)."""

    code = "invalid_source_uid"
