"""AF_ALG sockets: the kernel's hashes, ciphers, AEADs and RNGs through :mod:`socket`.

Every object owns two file descriptors: the *transform* socket (``bind()`` to the algorithm,
``setsockopt(ALG_SET_KEY)``), and an *operation* socket from its ``accept()``, reused for every
operation. Objects are context managers; ``close()`` is idempotent; ``repr()`` shows the
algorithm and the descriptors, never a key.

Sizes are checked before any system call: a key, IV or tag size the kernel would refuse raises
:class:`ValueError` naming the sizes it accepts. Kernel errors keep their errno:
:class:`afalg.AlgorithmNotAvailable` (no such algorithm, or no AF_ALG),
:class:`afalg.InvalidTag` (EBADMSG: authentication failed; no plaintext is returned), and
:class:`afalg.AlgError` for the rest.

One AEAD operation, and one streaming chunk of a cipher, must fit the socket buffers: the kernel
holds the whole AEAD input before it runs, and a ``sendmsg()`` larger than ``SO_SNDBUF`` would
wait forever. The buffers are enlarged as needed (``SO_SNDBUF``, then ``SO_SNDBUFFORCE`` when
privileged); beyond ``net.core.wmem_max`` an operation is refused with a :class:`ValueError`.
"""

# The code lives in afalg._alg, one module per concern: refusal (why AF_ALG refused, and the
# remedies), base (the socket base, binding, buffers), aead, hashes (HMAC, splice), skciphers
# (CipherStream, PKCS#7), rng and proc (/proc/crypto). This module is their public face; the
# names imported "as" themselves are here, outside __all__, as they were before the split.

from __future__ import annotations

from afalg._alg.aead import AEAD
from afalg._alg.base import bind
from afalg._alg.hashes import HMAC, Hash, file_digest, new
from afalg._alg.proc import PROC_CRYPTO as PROC_CRYPTO
from afalg._alg.proc import AlgInfo, algorithms
from afalg._alg.refusal import AF_ALG_RESTRICT as AF_ALG_RESTRICT
from afalg._alg.refusal import RESTRICT_REMEDY as RESTRICT_REMEDY
from afalg._alg.refusal import RNG_NAMES as RNG_NAMES
from afalg._alg.refusal import af_alg_restrict as af_alg_restrict
from afalg._alg.refusal import kernel_lacks as kernel_lacks
from afalg._alg.refusal import not_available, privileged, socket_error
from afalg._alg.rng import RNG
from afalg._alg.skciphers import CipherStream, SKCipher
from afalg.errors import AlgError as AlgError
from afalg.errors import AlgorithmNotAvailable as AlgorithmNotAvailable
from afalg.errors import InvalidTag as InvalidTag
from afalg.errors import PaddingError as PaddingError

__all__ = [
    "AEAD",
    "HMAC",
    "RNG",
    "AlgInfo",
    "CipherStream",
    "Hash",
    "SKCipher",
    "algorithms",
    "bind",
    "file_digest",
    "new",
    "not_available",
    "privileged",
    "socket_error",
]

# Documented and pickled as afalg.alg's, where users import them from, not as afalg._alg's.
for _name in [*__all__, "af_alg_restrict", "kernel_lacks"]:
    globals()[_name].__module__ = __name__
del _name
