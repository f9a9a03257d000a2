"""litattn: a Lit-GPT style framework for research on attention mechanisms."""

from litattn.config import Config
from litattn.model import GPT

__all__ = ["GPT", "Config"]
__version__ = "0.1.0"
