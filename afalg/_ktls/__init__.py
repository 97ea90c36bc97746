"""kTLS's code apart from :class:`afalg.ktls.KTLSSocket`; the public face is :mod:`afalg.ktls`."""
