"""Certification methods as plug-ins: importing this package registers every built-in method."""

from smoothcert.methods.base import COMMON_COLUMNS, CertifyMethod, RunContext, method_class
from smoothcert.methods.records import MemoryDecision, MethodRecord, Prediction, record_row
from smoothcert.methods.fixed import FixedSigma
from smoothcert.methods.dds import DDS  # noqa: F401  (registers --method dds)
from smoothcert.methods.ancer import ANCER  # noqa: F401  (registers --method ancer)
from smoothcert.methods.rancer import RANCER, RANCERBest  # noqa: F401  (registers --method rancer, rancer-best)
from smoothcert.methods.rddrs import RDDRS  # noqa: F401  (registers --method rddrs)
from smoothcert.methods.firstorder.method import FirstOrder  # noqa: F401  (registers --method first-order)
from smoothcert.methods.topk import TopK  # noqa: F401  (registers --method topk)
from smoothcert.methods.semantic import Translation  # noqa: F401  (registers --method translation)
from smoothcert.methods.rotation import Rotation  # noqa: F401  (registers --method rotation)

__all__ = ["COMMON_COLUMNS", "CertifyMethod", "FixedSigma", "MemoryDecision", "MethodRecord", "Prediction",
           "RunContext", "method_class", "record_row"]
