"""The main demo (``make demo``): what the kernel offers, then afalg at work on it.

Runs natively where the kernel has AF_ALG and kTLS, otherwise re-runs itself under a Debian
kernel booted with ``afalg vm`` (installing the VM first when run as root).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
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

    return echo_demo()


def echo_demo() -> int:
    """The TLS echo/file server in kTLS mode, clients in kTLS and algif modes. The client and
    the server each print a summary with the kernel's TLS counters."""
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp, "www")
        served.mkdir()
        blob = os.urandom(4 << 20)
        Path(served, "blob.bin").write_bytes(blob)
        ready = Path(tmp, "ready")
        server = subprocess.Popen([
            sys.executable, str(HERE / "tls_echo_server.py"), "--mode", "ktls", "--port", "0",
            "--serve-dir", str(served), "--ready-file", str(ready),
        ])  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() or not ready.read_text().strip():
                if server.poll() is not None or time.monotonic() > deadline:
                    print("demo: the echo server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            port = ready.read_text().split()[1]
            client = [sys.executable, str(HERE / "tls_echo_client.py"), "--port", port]
            runs = [
                ("TLS 1.3 echo, client in kTLS", ["--mode", "ktls", "--send", "1M"]),
                ("TLS 1.2 ChaCha20-Poly1305 echo, client on the algif record layer",
                 ["--mode", "algif", "--tls", "1.2", "--ciphers", "ECDHE+CHACHA20",
                  "--send", "256k"]),
                ("4 concurrent kTLS clients", ["--mode", "ktls", "--connections", "4",
                                               "--send", "256k"]),
                ("sendfile: GET /blob.bin (4 MiB) from the kTLS server",
                 ["--mode", "ktls", "--get", "/blob.bin",
                  "--sha256", hashlib.sha256(blob).hexdigest()]),
            ]  # fmt: skip
            failed = 0
            for title, extra in runs:
                print(f"\n--- {title}", flush=True)
                failed += subprocess.run([*client, *extra]).returncode != 0
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        title = "asyncio: GET /blob.bin from examples/aio_file_server.py (aio.sendfile, kTLS)"
        print(f"\n--- {title}", flush=True)
        runs.append((title, []))
        failed += aio_demo(served, hashlib.sha256(blob).hexdigest(), Path(tmp, "aio-ready")) != 0
    print(f"\ndemo: {len(runs) - failed} of {len(runs)} client runs succeeded")
    return 1 if failed else 0


def aio_demo(served: Path, digest: str, ready: Path) -> int:
    """The asyncio file server (afalg.aio) in kTLS mode and one client fetching a file."""
    server = subprocess.Popen([
        sys.executable, str(HERE / "aio_file_server.py"), "--mode", "ktls", "--port", "0",
        "--serve-dir", str(served), "--ready-file", str(ready),
    ])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text().strip():
            if server.poll() is not None or time.monotonic() > deadline:
                print("demo: the asyncio file server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        port = ready.read_text().split()[1]
        return subprocess.run([
            sys.executable, str(HERE / "tls_echo_client.py"), "--port", port, "--mode", "ktls",
            "--get", "/blob.bin", "--sha256", digest,
        ]).returncode  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


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
