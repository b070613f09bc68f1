"""Architecture specs: which axes every tensor dimension spans."""

from growkit.arch.registry import family_for, infer_config, supported_model_types
from growkit.arch.spec import Dim, Family, Sizes, TensorSpec

__all__ = ["Dim", "Family", "Sizes", "TensorSpec", "family_for", "infer_config", "supported_model_types"]
