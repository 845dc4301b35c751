"""megacore.transformer: the transformer layer, forward and backward in C++.

``TransformerConfig`` (a dataclass) configures it; ``TransformerLayer`` is the ``nn.Module`` that owns
the (tensor-parallel) parameters and calls ``torch.ops.megacore.transformer_layer``;
``transformer_layer`` is the functional form and ``transformer_layer_decode`` the same block over new tokens with
a key/value cache. ``megacore.transformer.reference`` composes the block in Python from ``megacore.ops``: the
tests' oracle (only tests and benchmarks import it).
"""

from megacore.transformer.config import TransformerConfig
from megacore.transformer.layer import (PARAM_NAMES, TransformerLayer, dropout_seed, transformer_layer,
                                        transformer_layer_decode)

__all__ = ["PARAM_NAMES", "TransformerConfig", "TransformerLayer", "dropout_seed", "transformer_layer",
           "transformer_layer_decode"]
