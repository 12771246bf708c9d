"""First-order certificates (seed 004): Cohen's protocol plus gradient-norm bounds from the same samples."""

from smoothcert.methods.firstorder.certificate import (FirstOrderCertificate, FirstOrderPlan, Subspace,
                                                       certify_first_order, normalized_radii, parse_norms)
from smoothcert.methods.firstorder.method import FirstOrder

__all__ = ["FirstOrder", "FirstOrderCertificate", "FirstOrderPlan", "Subspace", "certify_first_order",
           "normalized_radii", "parse_norms"]
