"""The exception tree of afalg.errors is what its docstring draws: one base, the standard types
kept where callers catch them."""

from __future__ import annotations

import errno
import inspect
import ssl

import pytest

import afalg
from afalg import errors
from afalg.wire import AlertDescription

CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_an_afalg_error(cls: type[Exception]) -> None:
    assert issubclass(cls, errors.AfalgError)
    assert cls.__name__ in errors.__all__ and getattr(afalg, cls.__name__) is cls


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (errors.AlgError, (OSError,)),
        (errors.PaddingError, (errors.AlgError, ValueError)),
        (errors.KTLSError, (OSError,)),
        (errors.TLSError, (ssl.SSLError,)),
        (errors.TLSProtocolError, (errors.TLSError,)),
        (errors.KeyUpdateUnsupported, (errors.TLSProtocolError,)),
        (errors.TLSAlertReceived, (errors.TLSError,)),
        (errors.HandoffError, (errors.TLSError,)),
        (errors.KeyLimitReached, (errors.TLSError,)),
        (errors.UnsupportedCipherSuite, (ValueError,)),
        (errors.ClosedError, (OSError, ValueError)),
        (errors.WantRead, (ssl.SSLWantReadError, BlockingIOError)),
        (errors.WantWrite, (ssl.SSLWantWriteError, BlockingIOError)),
    ],
)
def test_the_standard_types_callers_catch(cls: type[Exception], bases: tuple[type, ...]) -> None:
    assert all(issubclass(cls, base) for base in bases), cls.__mro__


def test_instances_carry_what_they_say() -> None:
    closed = errors.ClosedError("record layer")
    assert closed.errno == errno.EBADF and str(closed).endswith("record layer is closed")
    limit = errors.KeyLimitReached("no more")
    assert limit.alert is AlertDescription.internal_error and "internal_error" in str(limit)
    want = errors.WantRead(errno.EAGAIN, "wait")
    assert want.errno == errno.EAGAIN and isinstance(want, BlockingIOError)
    suite = errors.UnsupportedCipherSuite(0x00FF)
    assert suite.suite == 0x00FF and "0x00FF" in str(suite) and "set_ciphers" in str(suite)


def test_no_af_alg_names_the_ways_out() -> None:
    """Where AF_ALG is missing the error says what still runs and how (issue 25 item 11)."""
    exc = errors.AlgorithmNotAvailable.no_af_alg(errno.EAFNOSUPPORT, "no AF_ALG here")
    assert exc.errno == errno.EAFNOSUPPORT and exc.af_alg_restrict is None
    text = str(exc)
    assert text.startswith("[Errno 97] no AF_ALG here; ")
    ways = ["hashlib", 'backend="cryptography"', 'algif_backend="cryptography"', 'mode="ktls"']
    for way in [*ways, "`afalg vm -- CMD`"]:
        assert way in text, way
