"""Hugging Face interop: load local safetensors checkpoints and export them back."""

from kithara.models.hf.checkpoint import is_hf_checkpoint, load_causal_lm, read_config
from kithara.models.hf.export import save_in_hf_format
from kithara.models.hf.peft import load_peft_adapter, merge_peft_adapter, save_peft_adapter
from kithara.models.hf.weight_map import MODEL_TYPES, weight_map

__all__ = [
    "MODEL_TYPES",
    "is_hf_checkpoint",
    "load_causal_lm",
    "load_peft_adapter",
    "merge_peft_adapter",
    "read_config",
    "save_in_hf_format",
    "save_peft_adapter",
    "weight_map",
]
