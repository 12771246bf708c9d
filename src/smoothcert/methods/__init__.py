"""Certification methods as plug-ins: importing this package registers every built-in method."""

from .base import COMMON_COLUMNS, CertifyMethod, RunContext, certificate_row, method_class
from .fixed import FixedSigma

__all__ = ["COMMON_COLUMNS", "CertifyMethod", "FixedSigma", "RunContext", "certificate_row", "method_class"]
