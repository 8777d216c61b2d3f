"""Store-and-forward to remote specialists and the report return channel.

The functions the UI calls::

    request_forward(database, config, study_uid, destination, priority, requested_by) -> item id
    study_forwarding(database, study_uid) -> list of dicts (per destination)
    destination_status(database, config) -> list of dicts (per destination)
    study_reports(database, study_uid) -> list of dicts (reports with their text)
"""
from .outbox import cancel_item, request_forward, retry_item
from .reports import study_reports
from .status import destination_status, list_items, study_forwarding

__all__ = ["request_forward", "cancel_item", "retry_item", "study_forwarding", "destination_status", "list_items",
           "study_reports"]
