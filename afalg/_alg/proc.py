"""``/proc/crypto``: the algorithms the kernel has registered, parsed."""

from __future__ import annotations

from dataclasses import dataclass

PROC_CRYPTO = "/proc/crypto"


@dataclass(frozen=True)
class AlgInfo:
    """One entry of ``/proc/crypto`` (an algorithm implementation the kernel has registered).

    ``fields`` holds every ``key : value`` line, e.g. ``blocksize``, ``digestsize``,
    ``ivsize``, ``min keysize``, ``maxauthsize``, ``chunksize``."""

    name: str
    driver: str
    module: str
    priority: int
    type: str
    selftest: str
    internal: bool
    fields: dict[str, str]

    def size(self, key: str) -> int | None:
        """An integer field such as ``"digestsize"`` (None if absent)."""
        value = self.fields.get(key)
        return None if value is None else int(value)


def _parse_proc_crypto(text: str) -> list[AlgInfo]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "name" not in fields:
            continue
        out.append(
            AlgInfo(
                name=fields["name"],
                driver=fields.get("driver", ""),
                module=fields.get("module", ""),
                priority=int(fields.get("priority", "0")),
                type=fields.get("type", ""),
                selftest=fields.get("selftest", ""),
                internal=fields.get("internal") == "yes",
                fields=fields,
            )
        )
    return out


def algorithms(type: str | None = None, name: str | None = None) -> list[AlgInfo]:
    """Return the algorithms in ``/proc/crypto``, optionally of one type or name.

    ``type`` is "skcipher", "aead", "shash", "ahash", "rng", ... ("hash" matches both shash and
    ahash); ``name`` matches an algorithm's name or driver. Templates such as ``cbc(aes)``
    appear once something instantiated them (a ``bind()`` does)."""
    try:
        with open(PROC_CRYPTO) as f:
            infos = _parse_proc_crypto(f.read())
    except FileNotFoundError:
        return []
    if type is not None:
        types = {"shash", "ahash"} if type == "hash" else {type}
        infos = [i for i in infos if i.type in types]
    if name is not None:
        infos = [i for i in infos if name in (i.name, i.driver)]
    return infos


def _proc_sizes(name: str) -> AlgInfo | None:
    """The highest-priority /proc/crypto entry for ``name`` (what bind() picked)."""
    infos = [i for i in algorithms(name=name) if not i.internal]
    return max(infos, key=lambda i: i.priority) if infos else None
