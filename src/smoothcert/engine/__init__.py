"""The Monte Carlo engine (class counts, observers) and the smoothed classifier (PREDICT, CERTIFY, records)."""

from smoothcert.engine.sampling import DTYPES, Observer, input_generator, sample_counts
from smoothcert.engine.smooth import ABSTAIN, Certificate, Smooth, certify, dtype_name, predict

__all__ = ["DTYPES", "Observer", "input_generator", "sample_counts", "ABSTAIN", "Certificate", "Smooth", "certify",
           "dtype_name", "predict"]
