"""Models: the contract the trainer uses and the keras-hub implementations (causal and seq2seq)."""

from kithara.models.families import FAMILIES, Architecture
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.models.model import Model, ModelVariables
from kithara.models.precision import PRECISIONS
from kithara.models.quantization import QuantizationConfig
from kithara.models.scalar_head import ScalarHeadModel
from kithara.models.scale_config import ScaleConfig
from kithara.models.seq2seq_model import SEQ2SEQ_FAMILIES, KerasHubSeq2SeqModel

__all__ = [
    "FAMILIES",
    "PRECISIONS",
    "SEQ2SEQ_FAMILIES",
    "Architecture",
    "KerasHubModel",
    "KerasHubSeq2SeqModel",
    "LoraConfig",
    "Model",
    "ModelVariables",
    "QuantizationConfig",
    "ScalarHeadModel",
    "ScaleConfig",
]
