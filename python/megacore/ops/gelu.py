"""``bias_gelu``'s former home: the activation family lives in ``megacore.ops.activation``."""

from megacore.ops.activation import bias_gelu

__all__ = ["bias_gelu"]
