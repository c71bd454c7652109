"""Methods that wrap or extend any backbone. Each is one module that registers a ``MethodSpec``
(``recsys.methods.registry``); importing this package registers them all, one line each."""

from recsys.methods import clickprompt, din, elec, embedding_l2, llactr, plain, srp4ctr  # noqa: F401  (each registers its spec)
from recsys.methods.registry import METHODS, MethodSpec, Upstream, get_method, register

__all__ = ["METHODS", "MethodSpec", "Upstream", "get_method", "register"]
