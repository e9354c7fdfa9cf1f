"""The sign op's policy glue: a request off the wire, parsed and checked against the profile's policy.

``broker.signing_policy`` holds the rules; this module turns a ``sign``
request (``broker.agent.protocol``) into a ``SignRequest``, checks it, and
returns what the audit record says of it (never the signature, the timestamp
or any secret).
"""

from __future__ import annotations

import hmac
from typing import Any, NamedTuple

from ..errors import PolicyRefused, SigningError
from ..signing import binance
from ..signing_policy import SigningPolicy, SignRequest
from .protocol import BODY, ENDPOINT, METHOD, QUERY, WS_API, WS_METHOD, WS_PARAMS

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
    try:
        req = SignRequest.from_parts(query, body, endpoint, method)
    except PolicyRefused as exc:  # not NAME=VALUE: nothing parsed to summarise
        return Checked(query, body, {"endpoint": endpoint, "method": method}, exc)
    summary, refusal = policy.review(req)
    return Checked(query, body, summary, refusal)


class CheckedWs(NamedTuple):
    """A sign_ws request after the policy: the params to sign, what to record, and the refusal if any."""

    params: dict[str, str]
    method: str | None
    summary: dict[str, Any]
    refusal: PolicyRefused | None


def check_sign_ws(request: dict[str, Any], policy: SigningPolicy, api_key: object) -> CheckedWs:
    """Parse and check a ``sign_ws`` request (a WebSocket API request given as an object); SigningError
    when it is malformed (not recorded).

    The values are read as they are (they may hold ``=`` or ``&``); the policy
    sees them with the REST endpoint the method stands for
    (``binance.ws_method_endpoint``). ``apiKey`` must be the profile's own key.
    """
    params, ws_method, api = request.get(WS_PARAMS), request.get(WS_METHOD), request.get(WS_API) or "spot"
    if (not isinstance(params, dict)
            or not (ws_method is None or (isinstance(ws_method, str) and len(ws_method) <= 128))
            or api not in binance.WS_METHOD_ENDPOINTS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())):
        raise SigningError("the signing agent got a malformed sign_ws request")
    endpoint = binance.ws_method_endpoint(ws_method, api) if ws_method else None
    req = SignRequest(params=sorted(params.items()), endpoint=endpoint, method=None)
    summary = {**req.summary(), "ws_method": ws_method}
    try:
        if "signature" in params:
            raise PolicyRefused("already_signed", "the request already carries a signature",
                                "do not pass signature= yourself")
        if api_key is None or not hmac.compare_digest(params.get("apiKey", "").encode(), str(api_key).encode()):
            raise PolicyRefused("api_key", "the request's apiKey is not this profile's",
                                "leave apiKey out: the signer adds the profile's")
        policy.check(req)
    except PolicyRefused as exc:
        return CheckedWs(params, ws_method, summary, exc)
    return CheckedWs(params, ws_method, summary, None)
