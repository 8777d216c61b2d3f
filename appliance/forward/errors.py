"""Forwarding's errors (drawn in :mod:`appliance.errors`' tree).

The outbox treats them differently, so the distinction is made once, where the foreign error is
caught (pynetdicom, requests), and never by parsing messages later.  A peer's explicit refusal of
one dataset is not an error but an :class:`~appliance.forward.transfer.Outcome` (``refused``).
"""
from __future__ import annotations

from ..errors import ApplianceError


class TransientSendError(ApplianceError):
    """The link or the peer is unavailable or busy: retry later, forever."""

    code = "send_transient"


class PolicyBlocked(ApplianceError):
    """The box's own policy forbids sending this instance to this destination."""

    code = "policy_blocked"


class ForwardRequestError(ApplianceError):
    """A forward request or an outbox command names something that does not exist or cannot be done."""

    code = "forward_request_invalid"
