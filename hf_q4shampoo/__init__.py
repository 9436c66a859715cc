"""hf_q4shampoo: 4-bit Shampoo for Hugging Face Transformers."""

from .config import ConfigError, Q4ShampooConfig, parse_optim_args
from .optimizer import Q4Shampoo

__version__ = "0.1.0"

__all__ = ["Q4Shampoo", "Q4ShampooConfig", "ConfigError", "parse_optim_args", "__version__"]
