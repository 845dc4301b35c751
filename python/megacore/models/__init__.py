"""megacore.models: GPT, BERT/RoBERTa and ELECTRA assembled from the C++ transformer layer and the
tensor-parallel layers; ``build(name, **overrides)`` makes a preset."""

from megacore.models.common import ModelConfig
from megacore.models.gpt import GPTModel
from megacore.models.bert import BertModel, BertOutput
from megacore.models.electra import ElectraDiscriminatorModel, ElectraModel, ElectraOutput
from megacore.models.registry import PRESETS, build, preset_config, register

__all__ = ["GPTModel", "ModelConfig"]
__all__ += ["BertModel", "BertOutput"]
__all__ += ["ElectraDiscriminatorModel", "ElectraModel", "ElectraOutput"]
__all__ += ["PRESETS", "build", "preset_config", "register"]
