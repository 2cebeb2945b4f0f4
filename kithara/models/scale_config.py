"""ScaleConfig: how a decoder runs at real model sizes (docs/scale.md).

None of these options changes a variable, a checkpoint or an export: they change how the
training forward pass is traced (which activations are kept, whether the decoder layers are
one scanned loop, which attention kernel runs, which shardings activations are held to).
Cached decoding (``generate``) is never affected.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

REMAT_POLICIES = (
    "none",  # keep every activation (fastest, most memory)
    "full",  # keep only each decoder block's input; recompute the block in the backward pass
    "dots",  # keep the outputs of every matmul, recompute the elementwise work
    "dots_no_batch",  # keep matmul outputs without batch dimensions (the weights' products)
    "attention_out",  # keep the attention output of each block, recompute the rest
    "offload",  # like "full" but the block inputs live in host memory where the backend has it
)
ATTENTION_IMPLEMENTATIONS = (
    "keras",  # keras-hub's own path (today's)
    "auto",  # by backend: splash on TPU, cuDNN flash on NVIDIA GPUs, query-chunked elsewhere
    "xla",  # jax.nn.dot_product_attention(implementation="xla")
    "cudnn",  # jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPUs)
    "splash",  # the Pallas splash-attention kernel (TPU)
    "chunked",  # pure-JAX attention over query chunks, each rematerialised (any backend)
)


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Memory and compile-time options for a keras-hub decoder (``KerasHubModel(scale=...)``).

    Args:
        remat: rematerialisation policy per decoder block, one of ``REMAT_POLICIES``.
        scan_layers: run identical decoder layers as one ``jax.lax.scan`` (compile time does
            not grow with depth). Variables stay per layer: checkpoints, LoRA, Hugging Face
            import/export and sharding are unchanged.
        attention: attention implementation, one of ``ATTENTION_IMPLEMENTATIONS``.
        attention_chunk_size: query positions per chunk for ``"chunked"`` attention (and the
            block size of kernels that take one).
        activation_sharding: hold each decoder block's hidden states to the batch sharding
            (XLA's propagation otherwise may gather activations over the whole batch).
    """

    remat: str = "none"
    scan_layers: bool = False
    attention: str = "keras"
    attention_chunk_size: int = 512
    activation_sharding: bool = True

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of {REMAT_POLICIES}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown attention implementation {self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}."
            )
        if not isinstance(self.attention_chunk_size, int) or self.attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size must be a positive int, got {self.attention_chunk_size!r}.")
        if not isinstance(self.scan_layers, bool) or not isinstance(self.activation_sharding, bool):
            raise TypeError("scan_layers and activation_sharding must be bools.")
        if self.scan_layers and self.remat == "none":
            # A scan keeps every intermediate its backward pass needs, stacked over the layers.
            logger.warning(
                "scan_layers=True with remat='none' keeps each layer's intermediates stacked for the backward "
                "pass (more memory than unscanned); pair the scan with a remat policy (e.g. 'full' or 'dots_no_batch')."
            )
