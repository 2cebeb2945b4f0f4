"""MaxText's side of the ``peers`` suite: its native SFT trainer (``maxtext.trainers.post_train.sft
.train_sft_native``, MaxText's own training loop with ``use_sft=True``) on the same Llama-3 shape
and the same Hugging Face weights as kithara's side (bench/peers.py).

Runs in MaxText's own environment (``bench/.venv-maxtext``, Python 3.12: maxtext 0.2.5 needs
Python >= 3.12 and jax >= 0.11, kithara pins jax 0.10.2 on 3.11), never in kithara's:

    bench/.venv-maxtext/bin/python -m bench.peers_maxtext '[{"objective": "sft", ...}]'

The weights go through MaxText's own converter (``checkpoint_conversion.to_maxtext``, which
interleaves the RoPE halves and folds the query scale into the query kernel): it converts only
the checkpoints it names (``HF_IDS``), so this child hands it the weights' own
``transformers.LlamaConfig`` under the ``llama3.1-8b`` entry, with the dimensions overridden
(``override_model_config``). Training then reads them with ``load_parameters_path``.

MaxText's SFT trainer reads tokenized chat data or, as here, its synthetic batches: the loss is
next-token cross-entropy over every position (512 targets per 4 x 128 batch), so the step does
the work of kithara's and Tunix's SFT steps, but on other tokens. The step-0 check therefore
runs apart from training: MaxText's model, loaded from the converted weights, scores the suite's
first batch in a forward pass of MaxText's own (``maxtext_utils``' model creation), against the
same rows' loss on kithara's side. LoRA and DPO are not run: MaxText 0.2.5 does both through
Tunix, which cannot share this environment (maxtext[tpu] needs safetensors >= 0.8, Tunix 0.1.7
pins < 0.8).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _config_dir() -> str:
    import maxtext

    return os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")


def _shape_args(weights: str) -> list[str]:
    with open(os.path.join(weights, "config.json")) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 500_000)}
    return [
        f"base_emb_dim={hf['hidden_size']}",
        f"base_num_query_heads={heads}",
        f"base_num_kv_heads={hf['num_key_value_heads']}",
        f"base_mlp_dim={hf['intermediate_size']}",
        f"base_num_decoder_layers={hf['num_hidden_layers']}",
        f"head_dim={hf.get('head_dim') or hf['hidden_size'] // heads}",
        f"vocab_size={hf['vocab_size']}",
        f"rope_max_timescale={int(rope['rope_theta'])}",
        # MaxText's Llama RoPE (interleaved halves, the layout its converter writes q and k in),
        # without Llama 3.1's frequency scaling: the checkpoint's plain RoPE. (Its default RoPE
        # takes the halves as Hugging Face lays them out and would rotate the converted q/k wrong.)
        "rope_type=llama3.1",
        "rope_use_scale=false",
        f"normalization_layer_epsilon={hf['rms_norm_eps']}",
        "logits_via_embedding=false",
        "decoder_block=llama2",
        "mlp_activations=['silu','linear']",
        "enable_dropout=false",
    ]


def _common_args(weights: str, out: str) -> list[str]:
    return [
        "run_name=peers",
        f"base_output_directory={out}",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        "scan_layers=false",
        "dtype=float32",
        "weight_dtype=float32",
        "enable_checkpointing=false",
        "enable_tensorboard=false",
        *_shape_args(weights),
    ]


def convert(weights: str, out: str) -> str:
    """The weights as a MaxText parameter checkpoint, by MaxText's converter; its path."""
    import transformers
    from maxtext.checkpoint_conversion import to_maxtext
    from maxtext.checkpoint_conversion.utils import hf_model_configs

    hf_model_configs.HF_MODEL_CONFIGS["llama3.1-8b"] = transformers.LlamaConfig.from_pretrained(weights)
    to_maxtext.save_weights_to_checkpoint = _save_params
    args = [
        "to_maxtext",
        _config_dir(),
        "model_name=llama3.1-8b",
        "override_model_config=true",
        *_common_args(weights, out),
    ]
    to_maxtext.main(args, lazy_load_tensors=True, hf_model_path=weights, save_dtype="float32",
                    simulated_cpu_devices_count=1)  # fmt: skip
    return os.path.join(out, "0", "items")


def _save_params(maxtext_model_path: str, jax_weights: dict, *args: Any, **kwargs: Any) -> None:
    """The converted parameters as the orbax checkpoint ``load_parameters_path`` reads. MaxText's own
    saver wraps them in a flax ``TrainState``, which orbax 0.12.8 (the newest on PyPI, what
    maxtext[tpu] resolves to) has no handler for: its converter fails at that last step."""
    import jax
    import numpy as np
    from orbax.checkpoint import v1 as ocp

    lazy = to_maxtext_lazy()
    arrays = jax.tree.map(np.asarray, jax_weights, is_leaf=lambda x: isinstance(x, lazy))  # loads and converts
    params = arrays if "params" in arrays else {"params": arrays}
    # the layout of MaxText's saver: a TrainState's fields, whose `params` hold {"params": ...}
    ocp.save_checkpointables(os.path.join(maxtext_model_path, "0"), {"items": {"params": params}})


def _capture_synthetic_tokens() -> list[Any]:
    """MaxText's synthetic batch as it builds it (every step trains on the same one): its
    ``[batch, seq + 1]`` token ids, inputs ``[:, :-1]`` and targets ``[:, 1:]``, for the
    step-0 check on kithara's side."""
    import numpy as np
    from maxtext.input_pipeline import synthetic_data_processing as synthetic

    seen: list[Any] = []
    init = synthetic.SyntheticDataIterator.__init__

    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen.append(np.asarray(self.data[0]))

    synthetic.SyntheticDataIterator.__init__ = record
    return seen


def to_maxtext_lazy() -> type:
    from maxtext.checkpoint_conversion import to_maxtext

    return to_maxtext.LazyTensor


class _StepLog(logging.Handler):
    """Host time of each ``completed step`` line MaxText logs (one per step, once the step's
    metrics reach the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("completed step:"):
            self.marks.append(time.perf_counter())


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata

    import jax
    import numpy as np
    from absl import flags
    from maxtext.trainers.post_train.sft import train_sft_native
    from maxtext.utils import max_utils

    from bench.common import timing

    steps, seq, batch = spec["steps"], spec["seq"], spec["batch"]
    flags.FLAGS.mark_as_parsed()  # outside absl.app.run
    counted: list[int] = []
    count = max_utils.calculate_num_params_from_pytree

    def record(params: Any) -> int:  # MaxText counts its parameters once, at set-up
        counted.append(count(params))
        return counted[-1]

    max_utils.calculate_num_params_from_pytree = record
    tokens = _capture_synthetic_tokens()
    log = _StepLog()
    logging.getLogger().addHandler(log)
    with tempfile.TemporaryDirectory(prefix="maxtext-peers-") as tmp:
        items = convert(spec["weights"], os.path.join(tmp, "ckpt"))
        start = time.perf_counter()
        args = [
            "train_sft_native",
            _config_dir(),
            *_common_args(spec["weights"], os.path.join(tmp, "run")),
            f"load_parameters_path={items}",
            "dataset_type=synthetic",
            f"steps={steps}",
            f"per_device_batch_size={batch}",
            f"max_target_length={seq}",
            "remat_policy=none",  # kithara and Tunix do not rematerialise
            "attention=dot_product",
            "opt_type=adamw",
            "learning_rate=1e-4",
            "adam_b1=0.9",
            "adam_b2=0.999",
            "adam_eps=1e-8",
            "adam_weight_decay=0",
            "gradient_clipping_threshold=0",
            "log_period=1",
            "packing=false",
            f"metrics_file={os.path.join(tmp, 'metrics.jsonl')}",
        ]
        train_sft_native.main(args)
        with open(os.path.join(tmp, "metrics.jsonl")) as f:  # the losses at full precision
            metrics = [json.loads(line) for line in f]
    marks = [start, *log.marks]
    return {
        "framework": f"maxtext {importlib.metadata.version('maxtext')} / jax {jax.__version__}",
        "params": counted[0] if counted else -1,
        "trainable_params": counted[0] if counted else -1,
        "losses": [float(m["learning/loss"]) for m in metrics],
        "batch_tokens": tokens[0].tolist() if tokens else [],
        "loss_is_finite": bool(metrics and np.isfinite(metrics[-1]["learning/loss"])),
        **timing(marks, batch * seq),
    }


def main() -> None:
    specs = json.loads(sys.argv[1])
    import jax  # noqa: F401
    import maxtext.trainers.pre_train.train  # noqa: F401

    from bench.common import finish_child, rss_now_mib

    after_import = rss_now_mib()
    finish_child([train_once(spec) for spec in specs], after_import)


if __name__ == "__main__":
    main()
