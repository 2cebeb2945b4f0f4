"""Batched, jitted, KV-cached decoding over keras-hub's cache API, with explicit variables.

The whole decode (cache seeding, then one token per ``lax.while_loop`` iteration) is one
pure jitted function of ``(variables, token ids, ...)``. Prompts, new-token counts and the
batch are padded to power-of-two buckets, so calls inside a training loop reuse one
compiled program per bucket, and any variables of the model's structure (the trainer's
current state, another LoRA adapter) go in without recompiling or copying weights.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.models.model import ModelVariables
from kithara.models.sampling import choose_tokens, is_filtered

if TYPE_CHECKING:
    from kithara.models.keras_hub_model import KerasHubModel

# Stop ids travel as a fixed-size array (-1 = unused): stop sets of any size up to this share a program.
MAX_STOP_TOKENS = 8
# Chat templates' end-of-turn tokens: a reply ends at them (when they are single special tokens).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# (index, token ids, keras-hub cache, rows done, rng) carried through the decode loop.
_Carry = tuple[jax.Array, jax.Array, Any, jax.Array, jax.Array]


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two that is at least ``n`` and ``minimum``."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


class DecodePrograms(abc.ABC):
    """One jitted decode program per sampling mode (greedy or not, filtered or not) of a
    model's ``_decode``; each compiles once per bucket of shapes.

    Args:
        model: the model whose keras layers run the decode (its own variables are only
            the default; every call may pass others).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._programs: dict[tuple[bool, bool], Any] = {}

    @property
    def compilations(self) -> int:
        """Programs compiled so far (all modes and buckets): a guard against per-call retracing."""
        return sum(fn._cache_size() for fn in self._programs.values())

    def _program(self, greedy: bool, filtered: bool) -> Any:
        key = (greedy, filtered)
        if key not in self._programs:
            self._programs[key] = jax.jit(
                functools.partial(self._decode, greedy=greedy, filtered=filtered),
                out_shardings=sharding_lib.replicated(self.model.mesh),
            )
        return self._programs[key]

    @abc.abstractmethod
    def _decode(self, *args: Any, greedy: bool, filtered: bool) -> jax.Array:
        """The pure decode of one sampling mode, jitted by ``_program``: its arguments are
        the variables, the model's own arrays, then the stop ids, the rng and the
        temperature, top-k, top-p and min-p values (see ``_run``)."""

    def _padded_rows(self, rows: int) -> int:
        """The batch bucket: a power of two, rounded up to a multiple of the mesh's batch shards."""
        shards = sharding_lib.batch_shards(self.model.mesh)
        return -(-bucket(rows, 1) // shards) * shards

    def _run(
        self,
        variables: ModelVariables,
        inputs: Sequence[jax.Array],
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None = None,
        stop_token_ids: Sequence[int],
        rng: jax.Array,
    ) -> np.ndarray:
        """Runs the program of this sampling mode on ``variables``, the model's own
        ``inputs``, the stop ids (as a fixed-size array) and the sampling values (traced,
        so changing them does not recompile); returns the token ids on the host."""
        if len(stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"At most {MAX_STOP_TOKENS} stop_token_ids, got {len(stop_token_ids)}.")
        from kithara.trainer.offload import device_copy  # here: kithara.trainer imports the models

        variables = device_copy(variables)  # weights a trainer offloaded to host memory (a train state's)
        stops = np.full(MAX_STOP_TOKENS, -1, np.int32)
        stops[: len(stop_token_ids)] = list(stop_token_ids)
        greedy = not temperature
        filtered = not greedy and is_filtered(top_k, top_p, min_p)
        out = self._program(greedy, filtered)(
            variables,
            *inputs,
            put_rows(stops, self.model.mesh, by_row=False),
            rng,
            jnp.float32(temperature or 1.0),
            jnp.int32(top_k or 0),
            jnp.float32(1.0 if top_p is None else top_p),
            jnp.float32(min_p or 0.0),
        )
        return np.asarray(jax.device_get(out))


class GeneratesWithCache:
    """What both model wrappers share around ``generate``: one ``DecodePrograms`` of the
    class's ``generator_class``, built on first use and kept, so its compiled programs are
    reused by every later call."""

    generator_class: type[DecodePrograms]
    _generator: DecodePrograms | None = None

    @property
    def generator(self) -> Any:
        if self._generator is None:
            self._generator = self.generator_class(self)
        return self._generator

    @property
    def generate_compilations(self) -> int:
        """How many decode programs ``generate`` has compiled (one per bucket and sampling mode)."""
        return 0 if self._generator is None else self._generator.compilations


@dataclasses.dataclass(frozen=True)
class Prompts:
    """What ``generate`` was given, as token ids, and how to hand the output back."""

    token_ids: list[list[int]]
    as_text: bool  # strings in, strings out
    single: bool  # one string in, one string out
    tokenizer: Any

    def stop_ids(self, stop_token_ids: Sequence[int] | str | None) -> list[int]:
        """``"auto"``: the tokenizer's EOS for string prompts, none for token ids."""
        if stop_token_ids == "auto":
            return [self.tokenizer.eos_id] if self.as_text else []
        if isinstance(stop_token_ids, str):
            raise ValueError(f"stop_token_ids must be a list of ids, None or 'auto', got {stop_token_ids!r}.")
        return list(stop_token_ids or ())

    def output(self, outputs: list[list[int]]) -> Any:
        if not self.as_text:
            return outputs
        decoded = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        return decoded[0] if self.single else decoded


def read_prompts(
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Any,
    encode: Callable[[Any, str], list[int]],
    *,
    need_tokenizer: bool = False,
) -> Prompts:
    """Strings (encoded with ``encode(tokenizer, text)``) or token-id lists, checked."""
    single = isinstance(prompts, str)
    as_text = single or (len(prompts) > 0 and isinstance(prompts[0], str))
    if (as_text or need_tokenizer) and tokenizer is None:
        raise ValueError("String prompts need a tokenizer: pass tokenizer= or set model.tokenizer.")
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ValueError("generate() got no prompts.")
    if as_text:
        token_ids = [encode(tokenizer, cast(str, t)) for t in texts]
    else:
        token_ids = [[int(t) for t in cast(Sequence[int], r)] for r in texts]
    if any(len(r) == 0 for r in token_ids):
        raise ValueError("Every prompt needs at least one token (a BOS will do).")
    return Prompts(token_ids, as_text, single, tokenizer)


def as_key(seed: int | jax.Array) -> jax.Array:
    return jax.random.key(seed) if isinstance(seed, int) else seed


def cut_at_stop(tokens: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to (not including) the first stop token."""
    return tokens[: next((j for j, t in enumerate(tokens) if t in stop_token_ids), len(tokens))]


def split_at_stop(tokens: list[int], stop_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first stop token, and whether there was one."""
    kept = cut_at_stop(tokens, stop_token_ids)
    if len(kept) == len(tokens):
        return kept, False
    return tokens[: len(kept) + 1], True


class Generator(DecodePrograms):
    """Decodes with one ``KerasHubModel``; holds one jitted program per sampling mode."""

    model: KerasHubModel

    def __call__(
        self,
        token_ids: Sequence[Sequence[int]],
        ends: Sequence[int],
        *,
        variables: ModelVariables,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None,
        stop_token_ids: Sequence[int],
        rng: jax.Array,
    ) -> list[list[int]]:
        """New tokens of each prompt, uncut: row ``i`` continues up to total length
        ``ends[i]``; a row that met a stop token holds it, then the (meaningless) padding up
        to ``ends[i]``, so callers cut at the first stop token (``cut_at_stop`` or
        ``split_at_stop``)."""
        mesh = self.model.mesh
        rows = len(token_ids)
        padded_rows = self._padded_rows(rows)
        lengths = np.array([len(r) for r in token_ids] + [len(token_ids[0])] * (padded_rows - rows), np.int32)
        ends_arr = np.array(list(ends) + [ends[0]] * (padded_rows - rows), np.int32)
        total = bucket(int(lengths.max())) + bucket(int((ends_arr - lengths).max()))
        ids = np.zeros((padded_rows, total), np.int32)
        for i in range(padded_rows):
            ids[i, : lengths[i]] = token_ids[i if i < rows else 0]
        inputs = [put_rows(a, mesh, by_row=True) for a in (ids, lengths, ends_arr)]
        out = self._run(variables, inputs, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        stop_token_ids=stop_token_ids, rng=rng)  # fmt: skip
        return [out[i, lengths[i] : ends_arr[i]].tolist() for i in range(rows)]

    def _decode(  # type: ignore[override]
        self,
        variables: ModelVariables,
        token_ids_BxT: jax.Array,
        prompt_len_B: jax.Array,
        end_B: jax.Array,
        stop_ids_S: jax.Array,
        rng: jax.Array,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        min_p: jax.Array,
        *,
        greedy: bool,
        filtered: bool,
    ) -> jax.Array:
        """Right-padded prompts in, the same array with each row's continuation written in.

        As keras-hub's own samplers do, decoding starts at the shortest prompt; rows whose
        prompt is longer keep their prompt tokens until they reach its end, so every row's
        tokens equal those of decoding it alone.
        """
        causal_lm = self.model.causal_lm
        mapping = self.model.state_mapping(variables)
        batch, total = token_ids_BxT.shape
        with keras.StatelessScope(state_mapping=mapping):
            cache = seed_cache(causal_lm, token_ids_BxT)

        def body(carry: _Carry) -> _Carry:
            index, ids_BxT, cache, done_B, rng = carry
            last_Bx1 = jax.lax.dynamic_slice(ids_BxT, (0, index - 1), (batch, 1))
            with keras.StatelessScope(state_mapping=mapping):
                logits_Bx1xV, _, cache = causal_lm.call_with_cache(last_Bx1, cache, index - 1)
            rng, key = jax.random.split(rng)
            chosen_B = choose_tokens(
                logits_Bx1xV[:, 0], key, temperature, top_k, top_p, min_p, greedy=greedy, filtered=filtered
            )
            generating_B = (index >= prompt_len_B) & ~done_B
            current_B = ids_BxT[:, index]
            ids_BxT = ids_BxT.at[:, index].set(jnp.where(generating_B, chosen_B, current_B))
            stopped_B = (chosen_B[:, None] == stop_ids_S[None]).any(-1)
            done_B = done_B | (generating_B & (stopped_B | (index + 1 >= end_B)))
            return index + 1, ids_BxT, cache, done_B, rng

        def cond(carry: _Carry) -> jax.Array:
            index, _, _, done_B, _ = carry
            return (index < total) & ~done_B.all()

        start = jnp.min(prompt_len_B)
        carry = (start, token_ids_BxT, cache, jnp.zeros((batch,), bool), rng)
        return jax.lax.while_loop(cond, body, carry)[1]


def seed_cache(causal_lm: keras_hub.models.CausalLM, token_ids_BxT: jax.Array) -> Any:
    """keras-hub's cache, filled by one forward pass over the padded prompts. Gemma 3's
    ``_build_cache`` takes its (here absent) vision inputs as well."""
    if isinstance(causal_lm, keras_hub.models.Gemma3CausalLM):
        return causal_lm._build_cache(token_ids_BxT, None, None, None, None)[1]
    return causal_lm._build_cache(token_ids_BxT)[1]


def put_rows(array: np.ndarray, mesh: Mesh, *, by_row: bool) -> jax.Array:
    """A global array from the full host array every process holds, split by rows if asked
    (shared with ``seq2seq_generation``)."""
    sharding = sharding_lib.batch_sharding(mesh) if by_row else sharding_lib.replicated(mesh)
    return jax.make_array_from_callback(array.shape, sharding, array.__getitem__)


def default_stop_ids(tokenizer: Any, generation_config: dict[str, Any] | None) -> list[int]:
    """EOS, the ``eos_token_id`` of ``generation_config.json`` (one or a list), and the
    tokenizer's end-of-turn tokens that are single special tokens (``<|im_end|>``, ...)."""
    ids = [tokenizer.eos_id]
    configured = (generation_config or {}).get("eos_token_id")
    ids += configured if isinstance(configured, list) else [] if configured is None else [configured]
    backend = tokenizer.backend
    specials = set(getattr(backend, "all_special_tokens", []) or [])
    ids += [int(backend.convert_tokens_to_ids(token)) for token in END_OF_TURN_TOKENS if token in specials]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))[:MAX_STOP_TOKENS]
