"""megacore.models: GPT, BERT/RoBERTa, ELECTRA and T5 assembled from the C++ transformer layer and the
tensor-parallel layers, and a Classifier (sequence/token classification heads on their trunks, for fine-tuning);
``build(name, **overrides)`` makes a preset."""

from megacore.models.common import ModelConfig
from megacore.models.gpt import GPTModel
from megacore.models.bert import BertModel, BertOutput
from megacore.models.electra import ElectraDiscriminatorModel, ElectraModel, ElectraOutput
from megacore.models.position_bias import RelativePositionBias
from megacore.models.t5 import T5Config, T5Model
from megacore.models.classification import Classifier, ClassifierConfig, ClassifierOutput, backbone_of
from megacore.models.registry import MODEL_CLASSES, PRESETS, build, preset_config, register

__all__ = ["GPTModel", "ModelConfig"]
__all__ += ["BertModel", "BertOutput"]
__all__ += ["ElectraDiscriminatorModel", "ElectraModel", "ElectraOutput"]
__all__ += ["RelativePositionBias", "T5Config", "T5Model"]
__all__ += ["Classifier", "ClassifierConfig", "ClassifierOutput", "backbone_of"]
__all__ += ["MODEL_CLASSES", "PRESETS", "build", "preset_config", "register"]
