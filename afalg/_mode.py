"""Where a connection's records are protected, and the hand-off after the handshake.

The public face is :mod:`afalg.tls`, which documents these names.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import Any, Literal, cast, get_args

from afalg import handoff, ktls
from afalg._uapi import TLS_1_3_VERSION
from afalg.aead_backend import Backend, ChosenBackend, kernel_refusal
from afalg.algif import AlgTLSSocket
from afalg.errors import AlgError, KTLSError
from afalg.keys import CipherSuite, TrafficKeys
from afalg.ktls import KTLSSocket
from afalg.record import RecordLayer
from afalg.wire import AlertDescription, AlertLevel, ContentType

# Documented as afalg.tls.Mode and afalg.tls.ChosenMode, where users import them from
Mode = Literal["auto", "ktls", "algif"]
ChosenMode = Literal["ktls", "algif"]
# Backend and ChosenBackend (afalg.aead_backend): algif_backend= and conn.backend

MODES: tuple[Mode, ...] = get_args(Mode)
BACKENDS: tuple[Backend, ...] = get_args(Backend)


def choose_mode(
    version: int, suite: CipherSuite, mode: Mode = "auto", algif_backend: Backend = "auto"
) -> tuple[ChosenMode, ChosenBackend]:
    """Where the records of a connection using ``suite`` in ``version`` are protected.

    ``version`` is ``0x0303`` or ``0x0304``. Returns ``(mode, backend)``, one of ``("ktls",
    "kernel")``, ``("algif", "kernel")``, ``("algif", "cryptography")``. The one definition of
    ``mode="auto"``:

    1. kTLS, if this kernel runs the suite both ways (``TLS_TX`` and ``TLS_RX``);
    2. else algif on the kernel's AEAD, if AF_ALG binds it (``algif_backend`` "auto"/"kernel");
    3. else algif on pyca/cryptography (``algif_backend`` "auto"/"cryptography").

    ``mode="ktls"`` or ``"algif"`` and ``algif_backend="kernel"`` or ``"cryptography"`` narrow the
    choice. When nothing allowed can run it raises :class:`afalg.errors.KTLSError` (kTLS asked for)
    or :class:`afalg.AlgorithmNotAvailable` (the kernel AEAD asked for; its message says why, e.g.
    ``crypto.af_alg_restrict``). Each call tries the kernel afresh."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if algif_backend not in BACKENDS:
        raise ValueError(f"algif_backend must be one of {BACKENDS}, not {algif_backend!r}")
    if mode in ("auto", "ktls"):
        if ktls.supports(version, suite.ktls_cipher_type):
            return "ktls", "kernel"
        if mode == "ktls":
            name = "TLSv1.3" if version == TLS_1_3_VERSION else "TLSv1.2"
            raise KTLSError(
                errno.ENOPROTOOPT,
                f"this kernel does not run kTLS for {suite.name} in {name} both ways "
                "(`afalg info` shows what it runs); use mode='auto' or 'algif'",
            )
    if algif_backend in ("auto", "kernel"):
        refusal = kernel_refusal(suite)
        if refusal is None:
            return "algif", "kernel"
        if algif_backend == "kernel":
            raise refusal
    return "algif", "cryptography"


def _refuse(sock: socket.socket, tx: TrafficKeys) -> None:
    """Tell the peer the connection cannot go on: a fatal internal_error alert, then our FIN.

    The alert is sealed under our first traffic keys by pyca/cryptography (it needs neither AF_ALG
    nor kTLS)."""
    with contextlib.suppress(Exception):
        layer = RecordLayer(tx=tx, backend="cryptography")
        alert = bytes([AlertLevel.fatal, AlertDescription.internal_error])
        sock.sendall(layer.seal(ContentType.alert, alert))
        layer.close()
        sock.shutdown(socket.SHUT_WR)


def check_options(
    mode: str = "auto", algif_backend: str = "auto", records_per_key: int | None = None
) -> None:
    """Check the options of :func:`wrap` and :func:`hand_off` (and of :mod:`afalg.aio`).

    Called before any handshake: ``mode`` in :data:`MODES`, ``algif_backend`` in :data:`BACKENDS`
    (``ValueError``), ``records_per_key`` None or an int of at least 3 (``TypeError``,
    ``ValueError``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if algif_backend not in BACKENDS:
        raise ValueError(f"algif_backend must be one of {BACKENDS}, not {algif_backend!r}")
    if records_per_key is None:
        return
    if not isinstance(records_per_key, int) or isinstance(records_per_key, bool):
        raise TypeError("records_per_key must be an int or None")
    if records_per_key < 3:
        raise ValueError("records_per_key must be at least 3 (data, an open record, KeyUpdate)")


def hand_off(
    sock: socket.socket,
    handoff: handoff.Handoff,
    *,
    mode: Mode | str = "auto",
    algif_backend: Backend | str = "auto",
    suppress_ragged_eofs: bool = True,
    records_per_key: int | None = None,
) -> KTLSSocket | AlgTLSSocket:
    """The part of :func:`wrap` after the handshake: return the TLS socket over ``sock``.

    Chooses where the records of ``handoff`` (a finished :class:`afalg.handoff.Handshake`'s result)
    are protected (:func:`choose_mode`); the TLS socket then owns ``sock``. For drivers of the
    sans-I/O handshake (:mod:`afalg.aio`). When the mode asked for cannot run, the peer gets a fatal
    ``internal_error`` alert and the error is raised; ``sock`` is left to the caller then. kTLS
    attaches to established connections only: with ``mode="auto"``, a peer that half-closed before
    the hand-off (sent its data and FIN at once) gets algif mode instead."""
    check_options(mode, algif_backend, records_per_key)
    # checked: a Mode and a Backend (str too until afalg.aio's options carry the Literals)
    mode, algif_backend = cast(Mode, mode), cast(Backend, algif_backend)
    h = handoff
    common: dict[str, Any] = {
        "ssl_object": h.ssl_object,
        "suppress_ragged_eofs": suppress_ragged_eofs,
        "tickets": h.ticket_feed(),
        "records_per_key": records_per_key,
    }
    try:
        chosen, backend = choose_mode(h.version, h.cipher_suite, mode, algif_backend)
        if chosen == "algif":
            return AlgTLSSocket(sock, h.tx, h.rx, backend=backend, **common)
    except (AlgError, KTLSError):
        _refuse(sock, h.tx)  # nothing was installed on sock: the peer hears why, in TLS
        raise
    try:
        return KTLSSocket(sock, h.tx, h.rx, **common)
    except KTLSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        # The tls ULP attaches to established connections only: the peer half-closed (its
        # data and FIN are queued) before the hand-off. Nothing was installed; "auto" goes on
        # in algif mode, "ktls" tells the peer it cannot.
        if mode != "auto":
            _refuse(sock, h.tx)
            raise
    try:
        _, backend = choose_mode(h.version, h.cipher_suite, "algif", algif_backend)
        return AlgTLSSocket(sock, h.tx, h.rx, backend=backend, **common)
    except (AlgError, KTLSError):
        _refuse(sock, h.tx)
        raise
