"""afalg.alg.RNG, algorithms() and the NETLINK_CRYPTO query (kernel: run in the VM)."""

from __future__ import annotations

import pytest

import afalg
from afalg import alg, netlink

pytestmark = pytest.mark.kernel


def test_rng_reads() -> None:
    with alg.RNG() as rng:  # stdrng, or jitterentropy_rng on kernels built without the DRBG
        assert rng.name == ("jitterentropy_rng" if alg.kernel_lacks("stdrng") else "stdrng")
        a, b = rng.read(1000), rng.read(1000)  # more than one 128-byte kernel read
        assert len(a) == len(b) == 1000 and a != b
        assert rng.read(0) == b""
    with alg.RNG(seed=b"personalization") as rng:
        assert len(rng.read(64)) == 64
    rng.close()
    with pytest.raises(afalg.AlgError):
        rng.read(1)


def test_drbg_cpython_case() -> None:
    # CPython test_socket LinuxKernelCryptoAPI.test_drbg_pr_sha256
    lacks = alg.kernel_lacks("drbg_pr_sha256")
    if lacks:  # Debian's 7.3: CONFIG_CRYPTO_DRBG is not set; the error says so
        for name in ("drbg_pr_sha256", "stdrng"):
            with pytest.raises(afalg.AlgorithmNotAvailable, match="CONFIG_CRYPTO_DRBG is not set"):
                alg.RNG(name)
        return
    with alg.RNG("drbg_pr_sha256", seed=bytes(16)) as rng:
        assert len(rng.read(7)) == 7


def test_algorithms_from_proc_crypto() -> None:
    alg.AEAD("gcm(aes)", bytes(16)).close()  # instantiates the template
    infos = alg.algorithms()
    assert any(i.name == "sha256" for i in infos)
    gcm = alg.algorithms(type="aead", name="gcm(aes)")
    assert gcm and all(i.type == "aead" for i in gcm)
    assert gcm[0].size("ivsize") == 12 and gcm[0].size("maxauthsize") == 16
    hashes = alg.algorithms(type="hash")
    assert {i.type for i in hashes} <= {"shash", "ahash"} and hashes


def test_netlink_query() -> None:
    info = netlink.query("sha256")
    assert info.name == "sha256" and info.type in ("shash", "ahash")
    assert info.report["digestsize"] == 32 and info.report["blocksize"] == 64
    assert info.selftest and not info.internal and info.priority > 0 and info.driver
    gcm = netlink.query("gcm(aes)", instantiate="aead")
    assert gcm.type == "aead" and gcm.report["ivsize"] == 12 and gcm.report["maxauthsize"] == 16
    cbc = netlink.query("cbc(aes)", instantiate="skcipher")
    assert cbc.type == "skcipher" and cbc.report["ivsize"] == 16
    assert (cbc.report["min_keysize"], cbc.report["max_keysize"]) == (16, 32)
    exact = netlink.query("", driver=cbc.driver)
    assert exact.driver == cbc.driver
    with pytest.raises(afalg.AlgorithmNotAvailable):
        netlink.query("nosuchalgorithm")
