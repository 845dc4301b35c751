"""megacore.interop: moving models between megacore and other libraries.

``megacore.interop.hf`` converts to and from Hugging Face ``transformers`` models and reads and writes
their safetensors checkpoint layout. ``transformers`` is an optional extra: it is imported only by the
functions that build or read a ``transformers`` model, never at import time.
"""

__all__ = ["hf"]
