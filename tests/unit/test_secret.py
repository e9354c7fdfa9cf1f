"""The secret-holding type never shows, copies or pickles its bytes."""

from __future__ import annotations

import copy
import pickle

import pytest

from broker.secret import Credentials, Origin, Secret, mask_id

VALUE = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"


def test_repr_str_format_are_masked() -> None:
    s = Secret(VALUE)
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % s, format(s, ">80")):
        assert VALUE not in shown
        assert "****" in shown


def test_reveal_is_explicit_and_exact() -> None:
    s = Secret(VALUE)
    assert s.reveal() == VALUE.encode()
    assert s.reveal_str() == VALUE
    assert len(s) == len(VALUE)


def test_wipe_zeroes_the_buffer_and_blocks_reveal() -> None:
    s = Secret(VALUE)
    buf = s._buf  # the real storage, to prove the bytes are gone, not just unreferenced
    s.wipe()
    assert bytes(buf) == bytes(len(VALUE))
    assert s.wiped
    assert "wiped" in repr(s)
    with pytest.raises(ValueError):
        s.reveal()
    s.wipe()  # idempotent


def test_cannot_be_pickled_or_copied() -> None:
    s = Secret(VALUE)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        copy.copy(s)
    with pytest.raises(TypeError):
        copy.deepcopy(s)


def test_equality_is_by_value_and_unhashable() -> None:
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") == b"abc"
    with pytest.raises(TypeError):
        hash(Secret("abc"))


def test_equality_uses_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert Secret("x") == Secret("x")
    assert calls


def test_memory_is_locked_where_allowed() -> None:
    # root on Linux may always mlock; elsewhere this documents best effort.
    s = Secret(VALUE)
    assert isinstance(s.memory_locked, bool)
    import os

    if os.geteuid() == 0:
        assert s.memory_locked


def test_credentials_repr_names_fields_not_values_and_wipes() -> None:
    creds = Credentials(
        profile="um-futures",
        origin=Origin(source="vault", path="secret/credbroker/x", version=3),
        fields={"api_key": Secret("AKxyz"), "api_secret": Secret(VALUE)},
    )
    text = repr(creds) + str(creds)
    assert "api_secret" in text and "version=3" in text
    assert VALUE not in text and "AKxyz" not in text
    with pytest.raises(TypeError):
        pickle.dumps(creds)
    creds.wipe()
    assert all(s.wiped for s in creds.values())


def test_mask_id_keeps_last_four() -> None:
    assert mask_id("AKIAEXAMPLE1234") == "********1234"
    assert mask_id("abc") == "***"
