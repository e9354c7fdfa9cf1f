"""The sign op's policy glue: a request off the wire, parsed and checked against the profile's policy.

``broker.signing_policy`` holds the rules; this module turns a ``sign``
request (``broker.agent.protocol``) into a ``SignRequest``, checks it, and
returns what the audit record says of it (never the signature, the timestamp
or any secret).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import PolicyRefused, SigningError
from ..signing_policy import SigningPolicy, SignRequest
from .protocol import BODY, ENDPOINT, METHOD, QUERY

#: Longest URL path or method name the agent takes.
_MAX_NAME = 2048


class Checked(NamedTuple):
    """A sign request after the policy: what to sign, what to record, and the refusal if any."""

    query: str
    body: str
    summary: dict[str, Any]
    refusal: PolicyRefused | None


def check_sign(request: dict[str, Any], policy: SigningPolicy) -> Checked:
    """Parse and check a ``sign`` request; SigningError when it is malformed (not recorded)."""
    query, body = request.get(QUERY, ""), request.get(BODY, "")
    endpoint, method = request.get(ENDPOINT), request.get(METHOD)
    if (type(query) is not str or type(body) is not str
            or endpoint is not None and (type(endpoint) is not str or len(endpoint) > _MAX_NAME)
            or method is not None and (type(method) is not str or len(method) > _MAX_NAME)):
        raise SigningError("the signing agent got a malformed sign request")
    summary: dict[str, Any] = {"endpoint": endpoint, "method": method}
    try:
        req = SignRequest.from_parts(query, body, endpoint, method)
        summary = req.summary()
        policy.check(req)
    except PolicyRefused as exc:
        return Checked(query, body, summary, exc)
    return Checked(query, body, summary, None)
