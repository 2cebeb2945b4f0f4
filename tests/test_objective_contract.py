"""The objective contract: public hooks only, one jit site per step, frozen models as
arguments, callbacks through StepInfo, no hidden host transfers."""

import ast
import inspect
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model

import kithara
from kithara.objectives import CycleTrainer, DPOTrainer, IterativeSFTTrainer, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = (DPOTrainer, CycleTrainer, SFTTrainer, IterativeSFTTrainer)


def self_attributes_assigned(source: str) -> set[str]:
    """Names ``x`` of every ``self.x = ...`` (also in tuples, annotated and augmented)."""
    names = set()

    def visit(target):
        if isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                visit(element)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            names.add(target.attr)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                visit(target)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            visit(node.target)
    return names


def base_private_names() -> set[str]:
    """Underscore names the base Trainer defines: its methods and its instance attributes."""
    names = {n for n in vars(kithara.Trainer) if n.startswith("_") and not n.startswith("__")}
    names |= {n for n in self_attributes_assigned(inspect.getsource(kithara.trainer.trainer)) if n.startswith("_")}
    return names


@pytest.mark.parametrize("cls", OBJECTIVES, ids=lambda c: c.__name__)
def test_objectives_override_no_private_method_and_assign_no_private_base_attribute(cls):
    private = base_private_names()
    assert {"_programs", "_restored_data_state", "_begin"} <= private  # the scan sees the base's own
    overridden = {n for n in vars(cls) if n in private}
    assert not overridden, f"{cls.__name__} overrides {overridden}"
    assigned = self_attributes_assigned(inspect.getsource(inspect.getmodule(cls)))
    assert not assigned & private, f"{cls.__name__}'s module assigns {assigned & private}"


def docs_objective() -> str:
    """The worked objective of docs/trainer.md ("Writing an objective")."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    section = text[text.index("## Writing an objective") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_objective_is_short_and_distils_a_teacher():
    code = docs_objective()
    assert len(code.strip().splitlines()) < 80
    namespace: dict = {}
    exec(compile(code, "docs/trainer.md", "exec"), namespace)
    teacher = tiny_model("qwen3", seed=1, head_dim=16, vocab_size=61, tie_word_embeddings=False)
    loader = kithara.Dataloader(pattern_examples(64, vocab=61), 1, seed=0)
    # The teacher first learns the patterns; the student then learns them from its logits.
    kithara.Trainer(teacher, kithara.optimizers.adamw(1e-2), loader, steps=30, progress_bar=False).train()
    student = tiny_model("qwen3", seed=2, head_dim=12, vocab_size=61, tie_word_embeddings=False)
    trainer = namespace["DistillationTrainer"](
        student, teacher, kithara.optimizers.adamw(1e-2), loader, steps=30, temperature=2.0, progress_bar=False
    )
    teacher_before = jax.tree.map(np.asarray, teacher.variables)
    history = trainer.train()
    assert history[-1]["kl"] < 0.5 * history[0]["kl"], [h["kl"] for h in history]
    assert trainer.compilations == {"train_step": 1, "eval_step": 0, "score": 0}
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, teacher.variables))
    # The teacher is an argument of the compiled step (its own shardings), not a constant.
    lowered = trainer.lower_train_step(trainer.init_state(), next(trainer.batches(0, None))[1])
    frozen_args = jax.tree.leaves(lowered.args_info[0][2])
    assert len(frozen_args) == len(jax.tree.leaves(teacher.variables))
    with pytest.raises(AttributeError, match="temperature is fixed at construction"):
        trainer.temperature = 1.0


def test_frozen_variables_off_the_mesh_are_refused():
    class OffMesh(kithara.Trainer):
        def frozen_variables(self):
            return {"w": np.ones(3, np.float32)}

    loader = kithara.Dataloader(pattern_examples(16), 1)
    with pytest.raises(ValueError, match="frozen_variables\\(\\) must return arrays placed on the model's mesh"):
        OffMesh(tiny_model(), kithara.optimizers.adamw(1e-3), loader, steps=1, progress_bar=False)


def test_step_constants_cannot_change_after_construction():
    pairs = [{"prompt": "hi how", "chosen": " fine", "rejected": " bye"}] * 8  # words the tokenizer knows
    from conftest import word_tokenizer

    trainer = DPOTrainer(tiny_model(vocab_size=32), train_dataset=pairs, tokenizer=word_tokenizer(),
                         max_length=8, steps=1, progress_bar=False)  # fmt: skip
    with pytest.raises(AttributeError, match="beta is fixed at construction"):
        trainer.beta = 0.5
    with pytest.raises(AttributeError, match="model is fixed at construction"):
        trainer.model = tiny_model()
    trainer.log_steps_interval = 5  # host-side settings stay writable


@pytest.mark.parametrize("kind", ["base", "dpo"])
def test_steady_state_loop_makes_no_implicit_host_transfer(kind):
    """Steps 3-8 under jax.transfer_guard("disallow"): the base Trainer with a ready optimizer,
    and DPO with a frozen reference passed into the step and the config's scheduled optimizer."""
    guard = {}

    class Guard(kithara.Callback):
        def needs_sync(self, step):
            return step in (2, 8)

        def on_step_end(self, info):
            if info.step == 2:
                guard["previous"] = jax.config.jax_transfer_guard
                jax.config.update("jax_transfer_guard", "disallow")
            elif info.step == 8:
                jax.config.update("jax_transfer_guard", guard.pop("previous"))
                guard["done"] = True

    if kind == "base":
        loader = kithara.Dataloader(pattern_examples(64), 1, seed=0)
        trainer = kithara.Trainer(
            tiny_model(), kithara.optimizers.adamw(1e-3), loader, steps=10, progress_bar=False, callbacks=[Guard()]
        )
    else:
        from conftest import word_tokenizer

        pairs = [{"prompt": "hi how", "chosen": " are you", "rejected": " bye ok"}] * 16
        trainer = DPOTrainer(tiny_model(vocab_size=32), train_dataset=pairs, processing_class=word_tokenizer(),
                             max_length=8, max_steps=10, learning_rate=1e-3, lr_scheduler_type="linear",
                             callbacks=[Guard()], disable_tqdm=True)  # fmt: skip
        assert trainer.reference == "frozen_copy" and trainer.frozen is not None
    try:
        trainer.train()
    finally:
        if "previous" in guard:
            jax.config.update("jax_transfer_guard", guard["previous"])
    assert guard == {"done": True} and len(trainer.history) == 10


def test_callbacks_see_step_info_and_can_stop_training():
    seen = []

    class StopAtThree(kithara.Callback):
        def on_train_begin(self, info):
            seen.append(("begin", info.step, info.total_steps, info.restored_step))

        def needs_sync(self, step):
            return step == 3

        def on_step_end(self, info):
            if info.step == 3:
                assert int(info.state.step) == 3 and info.data_state()["batch"] == 3
                info.request_stop()

        def on_train_end(self, info):
            seen.append(("end", info.step, info.error))

    loader = kithara.Dataloader(pattern_examples(64), 1, seed=0, shuffle=False)
    trainer = kithara.Trainer(
        tiny_model(), kithara.optimizers.adamw(1e-3), loader, steps=10, progress_bar=False, callbacks=[StopAtThree()]
    )
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2, 3]  # synced at 3: step 4 was never dispatched
    assert seen == [("begin", 0, 10, None), ("end", 3, None)]
    with pytest.raises(ValueError, match="reason must be one of"):
        kithara.StepInfo(1, 0, 1, 0, None, {}, None, None, lambda: None, dict).request_stop("tired")
