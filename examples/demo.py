"""The main demo (``make demo``): what the kernel offers, then afalg at work on it.

Runs natively where the kernel has AF_ALG and kTLS, otherwise re-runs itself under a Debian
kernel booted with ``afalg vm`` (installing the VM first when run as root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def in_kernel() -> int:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from afalg.alg import AEAD
    from afalg.probe import format_report, probe

    caps = probe()
    print(format_report(caps), flush=True)
    if not caps.af_alg:
        print(f"demo: AF_ALG is not usable: {caps.af_alg_reason}", file=sys.stderr)
        return 1

    key, nonce, aad = os.urandom(16), os.urandom(12), b"header"
    message = b"afalg: AES-GCM sealed by the kernel, checked by cryptography"
    with AEAD("gcm(aes)", key) as aead:
        sealed = aead.encrypt(nonce, message, aad)
        assert sealed == AESGCM(key).encrypt(nonce, message, aad), "kernel and cryptography differ"
        assert aead.decrypt(nonce, sealed, aad) == message
    print(f"\nAEAD round trip: gcm(aes) sealed {len(message)} bytes into {len(sealed)}; "
          "identical to cryptography's AESGCM, and opened again")  # fmt: skip

    echo = HERE / "echo_demo.py"
    if echo.exists():
        return subprocess.run([sys.executable, str(echo)]).returncode
    return 0


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    from afalg.probe import probe

    if os.environ.get("AFALG_IN_VM") or probe().af_alg:
        return in_kernel()
    print("demo: this kernel has no AF_ALG; running the demo under a Debian kernel (afalg vm)",
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "afalg", "vm", "--timeout", "900", "--env", "AFALG_IN_VM=1"]
    if os.geteuid() == 0:
        cmd.append("--install")
    return subprocess.run([*cmd, "--", sys.executable, __file__], cwd=HERE.parent).returncode


if __name__ == "__main__":
    raise SystemExit(main())
