"""megacore.transformer: the transformer layer, forward and backward in C++.

``TransformerConfig`` (a dataclass) configures it; ``TransformerLayer`` is the ``nn.Module`` that owns
the (tensor-parallel) parameters and calls ``torch.ops.megacore.transformer_layer``;
``transformer_layer`` is the functional form; ``reference.transformer_layer_reference`` is the same
block composed in Python from ``megacore.ops``, kept as the tests' reference.
"""

from megacore.transformer import reference
from megacore.transformer.config import TransformerConfig
from megacore.transformer.layer import PARAM_NAMES, TransformerLayer, dropout_seed, transformer_layer

__all__ = ["PARAM_NAMES", "TransformerConfig", "TransformerLayer", "dropout_seed", "reference", "transformer_layer"]
