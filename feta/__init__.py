"""feta: token adaptation (prefixes) vs weight adaptation (LoRA), trained, compiled and compared."""

__version__ = "0.1.0"
