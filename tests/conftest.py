"""Test set-up: 8 forced CPU devices and -O0 code generation (set before JAX starts), tiny models and data."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# XLA:CPU's code generation without LLVM's optimisations: the tests' programs are tiny, and at
# -O0 the suite spends about a quarter less CPU compiling them (docs/performance.md, "The test
# suite"). Every subprocess a test starts gets the same flags through ``xla_flags``.
CODEGEN_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a test process: the tests' code generation, and ``devices`` forced CPU
    devices (JAX's default, one, when None)."""
    return CODEGEN_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


# XLA's default code generation, for a test's own jitted function whose check is agreement to the
# last bits with other code (bitsandbytes' multiply-adds, keras' rounding under a layer scan): at
# -O0 other products fuse and such a check sees a different, equally valid, rounding.
# ``jax.jit(f, compiler_options=DEFAULT_CODEGEN)`` compiles as users' programs are compiled.
DEFAULT_CODEGEN = {"xla_backend_optimization_level": 3}

# Set before JAX starts (kithara imports it).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

import kithara  # noqa: E402

# JAX's own environment variables for its persistent compilation cache (read when jax is imported).
CACHE_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    # A size limit turns on JAX's file lock around reads and writes: several processes share it.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 * 2**30),
}


def pytest_configure(config: pytest.Config) -> None:
    """Many tests build the same tiny model and trainer again (a resume test runs three identical
    trainers; doc blocks and examples build the same tiny models in turn), and XLA's compile
    dominates their time on CPU. A compilation cache for this session only (a fresh directory,
    removed at the end) lets an identical program compile once; nothing carries over between
    runs, and the jit caches (``compilations``) are unaffected. The directory is set in JAX's
    environment variables by the pytest process that owns it (the controller under xdist), so
    the xdist workers and every subprocess a test starts (doc blocks, examples, the CLI, serve)
    share it: a program compiled once in any of them is read back in the others. Users get the
    same by setting these variables (docs/performance.md, "The test suite")."""
    import jax  # after kithara, whose import first notes how logging was left

    if not hasattr(config, "workerinput"):  # the controller, or a run without workers: it owns the directory
        directory = tempfile.mkdtemp(prefix="kithara-test-jax-cache-")
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
        os.environ.update(CACHE_SETTINGS, JAX_COMPILATION_CACHE_DIR=directory)  # workers start after this
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    for name, value in CACHE_SETTINGS.items():  # jax read its variables at import, before they were set
        jax.config.update(name.lower(), float(value) if "." in value else int(value))


TINY = dict(vocab_size=64, num_layers=2, hidden_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64)


def tiny_model(family: str = "llama3", **kwargs) -> kithara.KerasHubModel:
    return kithara.KerasHubModel.from_config(family, **{**TINY, **kwargs})


TINY_SEQ2SEQ = dict(
    vocab_size=64, num_layers=2, hidden_dim=32, num_heads=4, intermediate_dim=64, max_sequence_length=64
)


def tiny_seq2seq(family: str = "bart", **kwargs) -> kithara.KerasHubSeq2SeqModel:
    return kithara.KerasHubSeq2SeqModel.from_config(family, **{**TINY_SEQ2SEQ, **kwargs})


def pattern_examples(n: int, length: int = 16, vocab: int = 64, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Learnable sequences: a random 3-token pattern repeated, with random lengths."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        size = int(rng.integers(6, length + 1))
        sequence = np.zeros(length + 1, np.int32)
        sequence[: size + 1] = np.resize(rng.integers(3, vocab, size=3), size + 1)
        valid = np.arange(length) < size
        examples.append(
            {
                "token_ids": sequence[:-1],
                "padding_mask": valid,
                "labels": sequence[1:],
                "label_mask": valid.astype(np.int32),
            }
        )
    return examples


@pytest.fixture(scope="session")
def examples() -> list[dict[str, np.ndarray]]:
    return pattern_examples(256)


ASSETS = Path(kithara.__file__).resolve().parent / "assets"
WORDS = ["user", "assistant", "system", "tool", "hi", "hello", "how", "are", "you", "fine", "thanks", "bye", "ok"]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
# Word ids for literal expected tensors: <pad>=0 <s>=1 </s>=2 <|im_start|>=3 <|im_end|>=4, words from 6.
W = {token: i for i, token in enumerate(SPECIALS + WORDS)}


def word_tokenizer(chat_template: str | None = None, bos: bool = True) -> kithara.Tokenizer:
    """A word-level tokenizer with known ids and the bundled ChatML template (with
    ``{% generation %}`` markers); newlines and punctuation vanish, so ids are easy to write out."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(W), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    template = chat_template or (ASSETS / "tokenizer" / "chat_template.jinja").read_text()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=template,
    )
    return kithara.Tokenizer(hf)
