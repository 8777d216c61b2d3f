"""The appliance's one error tree.

Foreign exceptions (pydicom, sqlite3, OSError, network libraries) are translated once, at the
boundary where they happen, into one of these (``raise StoreError(...) from exc``).  Every
class has a ``code``: a short reason (lowercase words joined by ``_``) for programs, logs and
words in the user's language; some set a finer one per instance (``AccountError("name_taken",
...)``).  What ends as a C-STORE response also carries its DICOM status (``dicom_status``).
Nobody decides anything from an error's message: it is English for people.

The tree (a class defined outside this module names its module):

* ApplianceError
  x ConfigError
  x StoreError                          dicom_status 0x0110 (processing failure)
    + OutOfSpaceError                   0xA700 (out of resources)
    + InvalidDatasetError               0xA900 (dataset does not match SOP class)
      - UnparsableDatasetError          0xC000 (cannot understand)
  x ImportPathError
  x ManifestError
  x DecodeError
  x InferenceError
    + BackendUnavailableError
  x QuantizeRefusedError
  x ValidationSetError                  (appliance.analyze.validate)
  x TransientSendError                  (appliance.forward.errors)
  x PolicyBlocked                       (appliance.forward.errors)
  x ForwardRequestError                 (appliance.forward.errors)
  x AccountError                        (appliance.accounts)
  x LockedError                         (appliance.login_throttle)
  x ReviewError                         (appliance.review)
  x LifecycleError                      (appliance.lifecycle)
  x DatabaseUnusableError               (appliance.dbguard)
    + DatabaseMissingError              (appliance.dbguard)
    + DatabaseCorruptError              (appliance.dbguard)
    + DatabaseMismatchError             (appliance.dbguard)
    + DatabaseInUseError                (appliance.dbguard)
    + RebuildRefusedError               (appliance.dbrebuild)
  x StaleResultError
  x InvalidSourceUID                    (also a ValueError)

Not in the tree, on purpose: exceptions that never leave the module that raises them
(``acquire.netpatch.PeerViolation``, caught in the DUL thread that raised it, and
``acquire.guard.AssociationRefused``, answered with an A-ASSOCIATE-RJ by the server that
raised it), and ``cli_common.DatabaseRefused``, click's form of a DatabaseUnusableError at the
command line (exit status 3).  ``tests/test_errors.py`` checks that this tree and the classes
agree.
"""
from __future__ import annotations


class ApplianceError(Exception):
    """Base class of every error the appliance raises on purpose."""

    code: str = "appliance_error"


class ConfigError(ApplianceError):
    """The configuration is invalid; the message names the key and the problem."""

    code = "config_invalid"


class StoreError(ApplianceError):
    """An instance could not be stored durably."""

    code = "store_failed"
    dicom_status: int = 0x0110  # processing failure: the sender may try again


class OutOfSpaceError(StoreError):
    """Free space under the data directory is below the configured floor."""

    code = "out_of_space"
    dicom_status = 0xA700  # out of resources


class InvalidDatasetError(StoreError):
    """A dataset lacks the identifiers needed to store it, or they contradict its request."""

    code = "dataset_invalid"
    dicom_status = 0xA900  # dataset does not match SOP class


class UnparsableDatasetError(InvalidDatasetError):
    """A dataset cannot be parsed (truncated, malformed elements or pixel data)."""

    code = "dataset_unparsable"
    dicom_status = 0xC000  # cannot understand


class ImportPathError(ApplianceError):
    """An import source path does not exist or cannot be read."""

    code = "import_path"


class ManifestError(ApplianceError):
    """A model package's manifest is invalid or does not match its files."""

    code = "manifest_invalid"


class DecodeError(ApplianceError):
    """Pixel data cannot be decoded into an image."""

    code = "decode_failed"


class InferenceError(ApplianceError):
    """A model could not be loaded or run."""

    code = "inference_failed"


class BackendUnavailableError(InferenceError):
    """The requested inference backend is not available on this machine."""

    code = "backend_unavailable"


class QuantizeRefusedError(ApplianceError):
    """The INT8 model lost too much accuracy against FP32 and was not written."""

    code = "quantize_refused"


# -- the results stage (appliance.results) ----------------------------------------------------

class StaleResultError(ApplianceError):
    """The image a result was computed on was replaced before its AI objects were built."""

    code = "source_replaced"


class InvalidSourceUID(ApplianceError, ValueError):
    """A source UID the AI objects must reference is not a valid UID (also a ValueError)."""

    code = "invalid_source_uid"
