"""The parity gate (engine vs the fake-quant model it came from) and validation reports."""

from saq_deploy.validate.run import PARITY_FILE, validate_engine

__all__ = ["PARITY_FILE", "validate_engine"]
