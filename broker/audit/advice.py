"""What each signature-failure answer means, and what to check, for the weekly review.

Binance's meanings are its own names and messages (the error codes page of
the Spot and USDⓈ-M Futures API docs: ``INVALID_TIMESTAMP`` -1021,
``INVALID_SIGNATURE`` -1022, ``BAD_API_KEY_FMT`` -2014, ``REJECTED_MBX_KEY``
-2015; HTTP 401, 418 and 429 from the "General info" / limits pages). The
likely causes are ordered for a bot run by credbroker: its secret comes from
Vault or the keyring and changes by rotation, so a rotation the exchange never
heard of comes before an encoding bug in a client credbroker signs for.
Each cause carries the one thing to check first.
"""

from __future__ import annotations

from typing import NamedTuple


class Cause(NamedTuple):
    """One likely cause and the single thing that confirms or rules it out."""

    cause: str
    check: str


class CodeAdvice(NamedTuple):
    """Binance's meaning of one answer, and its likely causes, most likely first."""

    label: str  # "-1022", or "HTTP 401" when the answer carried no Binance code
    name: str  # Binance's name for the code
    meaning: str
    key_problem: bool  # False: the key is fine, look elsewhere
    causes: tuple[Cause, ...]

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "name": self.name, "meaning": self.meaning, "key_problem": self.key_problem,
                "causes": [c._asdict() for c in self.causes]}


_TABLE: tuple[CodeAdvice, ...] = (
    CodeAdvice("-1021", "INVALID_TIMESTAMP",
               "the request's timestamp is outside recvWindow of the exchange's clock", False, (
                   Cause("this host's clock drifted", "`timedatectl` (or `chronyc tracking`) on the host: "
                         "is the clock synchronised?"),
                   Cause("recvWindow too small for this host's latency",
                         "the bot's recvWindow (Binance allows up to 60000 ms; 5000 by default)"),
                   Cause("a signed request sent (or replayed) long after it was signed",
                         "whether the bot queues signed requests; a replay from elsewhere also fails -2015 "
                         "when the key is IP-bound"),
               )),
    CodeAdvice("-1022", "INVALID_SIGNATURE",
               "the signature does not match the request for this API key's secret", True, (
                   Cause("the secret was rotated in Vault but the new one is not registered at the exchange "
                         "(or regenerated at the exchange but not stored in Vault)",
                         "that the API key shown in Binance's API management and the api_key of the Vault "
                         "version the bot used belong to the same key pair (`vault kv get` the path)"),
                   Cause("a PEM key (Ed25519/RSA) fed to an HMAC signer, or an HMAC secret to a PEM signer",
                         "the profile's [signer] kind against the key type registered at Binance"),
                   Cause("the secret has stray bytes (a trailing newline, quotes, whitespace)",
                         "`credbroker check -p PROFILE --json`: the secret field's size in bytes (a trailing "
                         "newline adds one)"),
                   Cause("an encoding bug in the client: it signs other bytes than it sends",
                         "that the bot signs the exact query string it sends (`get_signer().sign_query`)"),
                   Cause("something between the bot and the exchange changed the request",
                         "proxies or TLS inspection on the host's way out"),
               )),
    CodeAdvice("-2014", "BAD_API_KEY_FMT", "the X-MBX-APIKEY header is not a well-formed API key", True, (
        Cause("the API key field holds something else (the secret, whitespace, a newline, quotes)",
              "`credbroker check -p PROFILE --json`: the api_key field's size (Binance API keys are 64 "
              "characters)"),
        Cause("the profile maps the wrong field to the API key variable",
              "the profile's env table (which field becomes BINANCE_API_KEY)"),
        Cause("the client sends the key in another header or not at all",
              "that the bot sends the header X-MBX-APIKEY"),
    )),
    CodeAdvice("-2015", "REJECTED_MBX_KEY", "invalid API key, IP, or permissions for the action", True, (
        Cause("this host's outbound IP is not on the key's IP allow-list",
              "the host's public IP (`curl -s https://api.ipify.org`) against the key's IP restriction"),
        Cause("the key's permissions do not cover the endpoint (or were changed)",
              "the key's permissions in Binance's API management (futures, spot trading)"),
        Cause("the key was deleted or expired at the exchange",
              "that the API key still exists in Binance's API management"),
        Cause("a testnet key sent to the live exchange, or the reverse",
              "the base URL the bot uses against where the key was created"),
    )),
    CodeAdvice("HTTP 401", "Unauthorized", "the exchange did not accept the request's authentication", True, (
        Cause("the API key is missing from the request or unknown to the exchange",
              "that the bot sends X-MBX-APIKEY with the profile's api_key"),
        Cause("the key was deleted at the exchange", "that the API key still exists in Binance's API management"),
    )),
    CodeAdvice("HTTP 418", "IP banned", "this IP is auto-banned for sending requests after a 429", False, (
        Cause("a bot on this host ignored 429 answers and kept sending",
              "the Retry-After header and the bots' request weight on this host; stop them until it passes"),
        Cause("several bots share this host's IP and its request-weight limit",
              "how many bots run from this host's public IP"),
    )),
    CodeAdvice("HTTP 429", "Too many requests", "a request rate limit was broken", False, (
        Cause("a bot sends more request weight than the limit allows",
              "the X-MBX-USED-WEIGHT-* response headers and the bot's back-off on Retry-After"),
        Cause("several bots share this host's IP and its request-weight limit",
              "how many bots run from this host's public IP"),
    )),
)
ADVICE: dict[str, CodeAdvice] = {a.label: a for a in _TABLE}


def advice_for(label: str) -> CodeAdvice:
    """The advice for "-1022" / "HTTP 401"; a generic entry for an answer not in the table."""
    found = ADVICE.get(label)
    if found is not None:
        return found
    return CodeAdvice(label, "unknown", "an answer credbroker has no reading for", True, (
        Cause("see the exchange's error-code list for this code", "the message recorded with the failure"),))


# -- listenKey trouble (broker.signing.listenkey), shown beside the signature failures ----------------
# Binance's USDⓈ-M futures "User Data Streams" page: a listenKey lives 60 minutes after its creation or
# last keepalive (PUT); only a request with the account's API key can create, extend or close (DELETE)
# one; -1125 "This listenKey does not exist."; on the stream, {"e": "listenKeyExpired"} or an error.
_LISTEN_KEY_GONE_BY_OTHERS = Cause(
    "someone else holds the API key and closed the listenKey (DELETE needs only the API key, no signature)",
    "whether any process of yours uses this API key besides this bot; if none does, treat the key as leaked: "
    "disable it at the exchange and rotate it")
_LISTEN_KEY_TABLE: tuple[CodeAdvice, ...] = (
    CodeAdvice("-1125", "This listenKey does not exist",
               "the exchange no longer knows the listenKey: it expired or was closed", True, (
                   Cause("no keepalive reached the exchange for 60 minutes (the bot or the broker stopped, "
                         "the host slept, the network was down)",
                         "the listen_key_kept_alive and listen_key_failed records before it (`credbroker audit "
                         "show --event listen_key_kept_alive`)"),
                   Cause("the bot itself (or another bot of yours on the same API key) closed it on shutdown",
                         "which bots share this API key, and whether they DELETE /fapi/v1/listenKey when they stop"),
                   _LISTEN_KEY_GONE_BY_OTHERS,
               )),
    CodeAdvice("stream error", "Invalid listenKey (reported by the bot)",
               "the user data stream refused or dropped the bot's listenKey", True, (
                   Cause("the bot reconnected with an old listenKey after it was recreated",
                         "that the bot reconnects with keeper.listen_key (or the key report_stream_event returns)"),
                   Cause("the listenKey expired (no keepalive for 60 minutes)",
                         "the listen_key_kept_alive records of the hour before"),
                   _LISTEN_KEY_GONE_BY_OTHERS,
               )),
    CodeAdvice("listenKeyExpired", "listenKeyExpired (reported by the bot)",
               "the exchange ended the user data stream because its listenKey expired", False, (
                   Cause("no keepalive reached the exchange for 60 minutes",
                         "that the keeper ran (listen_key_kept_alive every ~30 minutes) and the host's network"),
                   Cause("the bot kept a stream open longer than 24 hours (Binance closes it)",
                         "whether the bot reconnects once a day"),
               )),
    CodeAdvice("no answer", "No answer", "the keepalive or creation did not reach the exchange", False, (
        Cause("the host's network or DNS failed", "the host's connectivity to the exchange at that time"),
        Cause("a wrong base URL for the keeper", "the URL the bot gives listen_key_keeper()"),
    )),
)
LISTEN_KEY_ADVICE: dict[str, CodeAdvice] = {a.label: a for a in _LISTEN_KEY_TABLE}


def listen_key_advice(label: str) -> CodeAdvice:
    """The advice for a listenKey failure label: -1125, "stream error", "listenKeyExpired", "no answer", or
    a key-trouble code (-2015, ...) read as the signature failures are."""
    return LISTEN_KEY_ADVICE.get(label) or advice_for(label)
