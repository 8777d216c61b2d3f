"""Forwarding's refinements of :class:`appliance.errors.SendError`.

The outbox treats them differently, so the distinction is made once, where the foreign error is
caught (pynetdicom, requests), and never by parsing messages later.
"""
from __future__ import annotations

from ..errors import ApplianceError, SendError


class TransientSendError(SendError):
    """The link or the peer is unavailable or busy: retry later, forever."""


class PeerRefused(SendError):
    """The peer explicitly refused a dataset: retrying the same bytes cannot help."""


class PolicyBlocked(SendError):
    """The box's own policy forbids sending this instance to this destination."""


class ForwardRequestError(ApplianceError):
    """A forward request or an outbox command names something that does not exist or cannot be done."""
