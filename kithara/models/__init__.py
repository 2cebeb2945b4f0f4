"""Models: the contract the trainer uses and the keras-hub implementation."""

from kithara.models.families import FAMILIES, Architecture
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.models.model import Model, ModelVariables
from kithara.models.precision import PRECISIONS

__all__ = ["FAMILIES", "PRECISIONS", "Architecture", "KerasHubModel", "LoraConfig", "Model", "ModelVariables"]
