"""The AF_ALG layer's code, one module per concern; :mod:`afalg.alg` is its public face."""
