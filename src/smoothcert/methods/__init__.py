"""Certification methods as plug-ins: importing this package registers every built-in method."""

from .base import COMMON_COLUMNS, CertifyMethod, RunContext, certificate_row, method_class
from .fixed import FixedSigma
from .dds import DDS  # noqa: F401  (registers --method dds)
from .ancer import ANCER  # noqa: F401  (registers --method ancer)
from .rancer import RANCER, RANCERBest  # noqa: F401  (registers --method rancer, rancer-best)
from .rddrs import RDDRS  # noqa: F401  (registers --method rddrs)
from .firstorder import FirstOrder  # noqa: F401  (registers --method first-order)

__all__ = ["COMMON_COLUMNS", "CertifyMethod", "FixedSigma", "RunContext", "certificate_row", "method_class"]
