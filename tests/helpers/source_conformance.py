"""The behaviour every secret source must show, written once.

Modelled on keyring's ``keyring.testing.backend.BackendBasicTests``: one
abstract class of cases; each source's test module subclasses it with a
small adapter that knows how to store a profile's fields in that backend
(a KV v2 secret, keyring entries, ...) and how to fetch through that source.
A source that disagrees with a case is the source's bug: the point is one
behaviour whatever backend a profile names.

The promises checked, for every source:

- all fields present: every field the profile names comes back, each a
  ``Secret`` whose ``repr`` shows no secret, and nothing else;
- a field missing: the whole fetch fails (all fields or none), the error
  names the field and carries a remedy;
- an empty value, a value no environment variable can hold (a NUL byte,
  bytes that are not UTF-8 text), a non-string value, an oversized value:
  refused with an error naming the field;
- a missing entry or path: fails closed with the source's remedy;
- wiped on error: every ``Secret`` made before the failure is wiped;
- no error text (message, remedy, ``repr``, the whole traceback chain)
  contains a secret value;
- refused names: an empty field name, an empty location or one with a
  ``..`` segment is refused before the backend is asked (``ConfigError``);
- the records ``broker.access`` writes for a fetch and for a refusal have one
  schema whatever the source (``request_id`` where the backend has one).
"""

from __future__ import annotations

import json
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest

from broker import access
from broker.access import Recorder
from broker.config import Config, Profile
from broker.errors import BrokerError, ConfigError, SourceError
from broker.secret import Credentials, Secret
from broker.sources.values import MAX_VALUE_BYTES

#: Values stored in the good fields of each case: distinctive, so a leak is found by a substring search.
API_KEY = "AK-conform-6b2e0f91c4"
API_SECRET = "SK-conform-d81f3a5e77"


class SourceAdapter(ABC):
    """What the suite needs to know about one source."""

    #: The ``Origin.source`` name a successful fetch reports.
    source: str
    #: True when the fetch runs in this process (its ``Secret`` objects can be watched being wiped);
    #: False when another process fetches (the daemon, a forked child) and only whole answers come back.
    in_process: bool = True

    @abstractmethod
    def store(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``values`` (field -> value, possibly not a string) at a fresh location; the profile
        options naming it."""

    @abstractmethod
    def absent(self) -> dict[str, Any]:
        """Profile options naming a location that holds nothing."""

    @abstractmethod
    def refused_locations(self) -> list[dict[str, Any]]:
        """Profile options whose location name must be refused (empty, a ``..`` segment)."""

    @abstractmethod
    def bad_values(self) -> dict[str, Any]:
        """Label -> a value this backend can hold but no bot can use (besides empty and oversized)."""

    @abstractmethod
    def fetch(self, profile: Profile) -> Credentials:
        """Fetch ``profile`` through this source, the way the broker does."""

    #: True when the backend names each read (Vault's ``request_id``, the id its own audit device logs).
    request_ids: bool = False
    #: ``use_daemon`` for ``broker.access.fetch``: whether a running ``credbroker daemon`` serves the read.
    use_daemon: bool = False

    @property
    @abstractmethod
    def env(self) -> Mapping[str, str]:
        """The environment the fetch reads its settings from."""

    def fetch_audited(self, profile: Profile, record: Recorder) -> Credentials:
        """Fetch ``profile`` through ``broker.access.fetch``, the one audited way, recording with ``record``."""
        return access.fetch(profile, config=Config(path=None, profiles={}), env=self.env, record=record,
                            use_daemon=self.use_daemon)

    def offline(self) -> AbstractContextManager[None]:
        """Within it the backend cannot answer (so a name refused late shows up as another error)."""
        return nullcontext()


class SourceConformance(ABC):
    """Subclass with an ``adapter`` fixture returning a ``SourceAdapter``; every case then runs for it."""

    @pytest.fixture
    @abstractmethod
    def adapter(self) -> SourceAdapter:  # pragma: no cover - each subclass provides it
        ...

    @pytest.fixture
    def made(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Secret]]:
        """Every ``Secret`` made in this process during the test that holds one of the stored field values
        (held here, so only an explicit wipe wipes it; the Vault token's own ``Secret`` is not watched)."""
        created: list[Secret] = []
        original = Secret.__init__
        watched = {API_KEY.encode(), API_SECRET.encode()}

        def tracking(self: Secret, value: Any) -> None:
            original(self, value)
            if self.reveal() in watched:
                created.append(self)

        monkeypatch.setattr(Secret, "__init__", tracking)
        yield created
        for secret in created:
            secret.wipe()

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def profile(options: Mapping[str, Any], *fields: str) -> Profile:
        names = fields or ("api_key", "api_secret")
        env = {f"VAR_{i}": name for i, name in enumerate(names)}
        return Profile(name=f"conform-{uuid.uuid4().hex[:8]}", source="", env=env, options=dict(options))

    def _profile(self, adapter: SourceAdapter, options: Mapping[str, Any], *fields: str) -> Profile:
        return self.profile(options, *fields)._replace(source=adapter.source)

    def refused(self, adapter: SourceAdapter, profile: Profile, made: list[Secret],
                cls: type[BrokerError] = SourceError, *, names: tuple[str, ...] = (),
                values: tuple[object, ...] = (API_KEY, API_SECRET)) -> BrokerError:
        """Fetch ``profile``, expect ``cls``; check the error is one clear line that leaks nothing and
        that every secret made meanwhile was wiped."""
        with pytest.raises(BrokerError) as info:
            creds = adapter.fetch(profile)
            creds.wipe()
        exc = info.value
        assert isinstance(exc, cls), f"{type(exc).__name__} ({exc}) is not a {cls.__name__}"
        assert exc.remedy, f"no remedy in {exc}"
        assert exc.exit_code == 125
        assert "\n" not in str(exc)
        for name in names:
            assert repr(name) in exc.message or name in exc.message, f"{name!r} not named in {exc.message!r}"
        shown = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.to_dict())
        for value in values:
            if isinstance(value, str) and len(value) >= 8:
                assert value not in shown, "a secret value is in the error"
            elif isinstance(value, (bytes, bytearray)) and len(value) >= 8:
                assert bytes(value).decode("latin-1") not in shown, "a secret value is in the error"
        assert all(s.wiped for s in made), "a secret fetched before the failure was not wiped"
        return exc

    # -- the cases -------------------------------------------------------------------------------

    def test_all_fields_present_returns_each_as_a_masked_secret(self, adapter: SourceAdapter,
                                                                 made: list[Secret]) -> None:
        options = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET, "unasked": "not-for-this-bot"})
        creds = adapter.fetch(self._profile(adapter, options))
        try:
            assert set(creds) == {"api_key", "api_secret"}  # what the profile names, nothing more
            assert all(isinstance(creds[name], Secret) for name in creds)
            assert creds["api_key"].reveal_str() == API_KEY
            assert creds["api_secret"].reveal_str() == API_SECRET
            assert creds.origin.source == adapter.source
            shown = repr(creds) + str(creds) + repr(dict(creds)) + f"{creds['api_secret']}"
            assert API_KEY not in shown and API_SECRET not in shown
        finally:
            creds.wipe()

    def test_a_missing_field_fails_the_whole_fetch(self, adapter: SourceAdapter, made: list[Secret]) -> None:
        options = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET})
        profile = self._profile(adapter, options, "api_key", "api_secret", "api_passphrase")
        self.refused(adapter, profile, made, names=("api_passphrase",))
        if adapter.in_process:  # the two fields read before the missing one were made, then wiped
            assert len(made) >= 2

    @pytest.mark.parametrize("label", ["empty", "oversized"])
    def test_an_empty_or_oversized_value_is_refused(self, adapter: SourceAdapter, made: list[Secret],
                                                   label: str) -> None:
        value = "" if label == "empty" else "x" * (MAX_VALUE_BYTES + 1)
        options = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET, "api_extra": value})
        profile = self._profile(adapter, options, "api_key", "api_secret", "api_extra")
        exc = self.refused(adapter, profile, made, names=("api_extra",), values=(API_KEY, API_SECRET, value))
        assert ("empty" if label == "empty" else str(MAX_VALUE_BYTES)) in exc.message
        if adapter.in_process:
            assert len(made) >= 2

    def test_a_value_at_the_size_limit_is_returned(self, adapter: SourceAdapter, made: list[Secret]) -> None:
        big = "k" * MAX_VALUE_BYTES  # a PEM key file is a few KiB: the limit leaves room
        options = adapter.store({"api_key": API_KEY, "api_secret": big})
        creds = adapter.fetch(self._profile(adapter, options))
        try:
            assert creds["api_secret"] == big.encode() and len(creds["api_secret"]) == MAX_VALUE_BYTES
        finally:
            creds.wipe()

    def test_a_value_no_bot_can_use_is_refused(self, adapter: SourceAdapter, made: list[Secret]) -> None:
        for label, value in adapter.bad_values().items():
            made.clear()
            options = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET, "api_extra": value})
            profile = self._profile(adapter, options, "api_key", "api_secret", "api_extra")
            shown = value if isinstance(value, (str, bytes)) else None
            try:
                self.refused(adapter, profile, made, names=("api_extra",),
                             values=(API_KEY, API_SECRET, *([shown] if shown else [])))
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}") from exc
            except pytest.fail.Exception as exc:  # pytest.raises found nothing raised
                raise AssertionError(f"{label}: {exc}") from exc

    def test_a_missing_entry_fails_closed_with_the_sources_remedy(self, adapter: SourceAdapter,
                                                                 made: list[Secret]) -> None:
        self.refused(adapter, self._profile(adapter, adapter.absent()), made)
        assert not made

    def test_refused_names_are_refused_before_the_backend_is_asked(self, adapter: SourceAdapter,
                                                                  made: list[Secret]) -> None:
        good = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET})
        cases = [self._profile(adapter, good, "api_key", ""), *(
            self._profile(adapter, options) for options in adapter.refused_locations())]
        with adapter.offline():
            for profile in cases:
                self.refused(adapter, profile, made, ConfigError)
        assert not made

    def test_the_access_record_has_one_schema_whatever_the_source(self, adapter: SourceAdapter,
                                                                   made: list[Secret]) -> None:
        options = adapter.store({"api_key": API_KEY, "api_secret": API_SECRET})
        records: list[tuple[str, dict[str, Any]]] = []

        def record(event: str, fields: dict[str, Any]) -> None:
            records.append((event, fields))

        profile = self._profile(adapter, options)
        adapter.fetch_audited(profile, record).wipe()
        missing = self._profile(adapter, options, "api_key", "api_passphrase")
        with pytest.raises(SourceError):
            adapter.fetch_audited(missing, record).wipe()
        assert [event for event, _ in records] == ["secret_fetched", "refused"]
        fetched, refused = records[0][1], records[1][1]

        assert FETCHED_KEYS <= set(fetched) <= FETCHED_KEYS | FETCHED_OPTIONAL, sorted(fetched)
        assert fetched["profile"] == profile.name and fetched["source"] == adapter.source
        assert fetched["fields"] == ["api_key", "api_secret"] and fetched["by"] == "library"
        assert isinstance(fetched["path"], str) and fetched["path"]
        assert REFUSED_KEYS <= set(refused) <= REFUSED_KEYS | REFUSED_OPTIONAL, sorted(refused)
        assert refused["profile"] == missing.name and refused["source"] == adapter.source
        assert "api_passphrase" in refused["reason"] and refused["by"] == "library"
        if adapter.request_ids:  # both reads are in the backend's own log under these ids
            assert isinstance(fetched["request_id"], str) and fetched["request_id"]
            assert isinstance(refused["request_id"], str) and refused["request_id"] != fetched["request_id"]
            assert refused["path"] == fetched["path"]
        else:
            assert "request_id" not in fetched and "request_id" not in refused
        shown = json.dumps(records)
        assert API_KEY not in shown and API_SECRET not in shown


#: The ``secret_fetched`` record's fields for every source; the optional ones where the source has them.
FETCHED_KEYS = {"profile", "source", "path", "version", "address", "fields", "by"}
FETCHED_OPTIONAL = {"request_id", "namespace", "via"}
#: The ``refused`` record's fields for every source; Vault's read id and path when Vault had answered.
REFUSED_KEYS = {"profile", "source", "error", "reason", "by"}
REFUSED_OPTIONAL = {"request_id", "path"}
