"""The method registry: one module per adapter initialisation.

============  ===========  ==================================================================
method        needs store  what initialises the adapter
============  ===========  ==================================================================
``lora``      no           PEFT's default (B = 0)
``pissa``     no           PEFT's principal-SVD init (largest components of W)
``milora``    no           smallest components of the plain SVD of W
``corda``     yes          covariance-oriented SVD of W C' (KPM: smallest, IPM: largest)
``corda++``   yes          CorDA with a covariance and a rank chosen per layer by compactness
============  ===========  ==================================================================

A new method subclasses :class:`Method` and calls :func:`register_method`.
"""

from corda_vl.methods.base import Decomposition, Method, get_method, method_names, register_method
from corda_vl.methods.lora import LORA
from corda_vl.methods.pissa import PISSA
from corda_vl.methods.milora import MILORA
from corda_vl.methods.corda import CORDA
from corda_vl.methods.cordapp import CORDA_PLUS_PLUS

__all__ = ["CORDA", "CORDA_PLUS_PLUS", "Decomposition", "LORA", "MILORA", "Method", "PISSA", "get_method",
           "method_names", "register_method"]
