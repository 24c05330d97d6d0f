import contextlib
import dataclasses

import pytest
import torch

import quiver.training as training
from quiver.adapters.lora import wrap_with_lora
from quiver.data.batching import collate, micro_batches, tokenize_example
from quiver.errors import QuiverError
from quiver.models import fingerprint, model_targets
from quiver.training import (
    TrainConfig,
    accumulate_gradients,
    gradient_checkpointing,
    plan_memory,
    target_only_loss,
    train_expert,
)

from .conftest import QUICK, make_task, new_library, restored


def test_target_only_loss_equals_the_full_logits_loss(tiny, toy_task):
    model, tokenizer = tiny
    examples = [tokenize_example(tokenizer, e, 64) for e in toy_task.examples[:5]]
    batch = collate(examples, tokenizer.pad_token_id)
    reference = model(**batch).loss  # transformers' own causal-LM loss over all logits
    torch.testing.assert_close(target_only_loss(model, batch), reference, rtol=1e-5, atol=1e-6)


def test_training_lowers_validation_loss_and_leaves_base_model_unchanged(tiny, toy_task):
    model, tokenizer = tiny
    before = fingerprint(model)
    config = dataclasses.replace(QUICK, steps=30, eval_every=10, lr=5e-3)
    expert, result = train_expert(model, tokenizer, [toy_task], "toy", config,
                                  show_progress=False)
    losses = [h["valid_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_valid_loss == min(losses)
    assert fingerprint(model) == before
    assert not any("lora" in n for n, _ in model.named_modules())
    assert expert.info.tasks == ["toy:copy"] and expert.info.base_fingerprint == before
    assert expert.adapter_config["r"] == 4 and expert.adapter_config["peft_type"] == "LORA"
    assert len(expert.lora_factors()) == 2 * 7  # 2 layers x 7 modules


def test_the_best_checkpoint_is_kept(tiny, toy_task, monkeypatch):
    model, tokenizer = tiny
    scripted = iter([3.0, 1.0, 2.0])  # validation losses at steps 2, 4, 6
    snapshots = {}

    def fake_validate(trainer, *args):  # trainer: the loop's TrainableAdapter
        loss = next(scripted)
        snapshots[loss] = trainer.weights()
        return loss

    monkeypatch.setattr(training.loop, "validation_loss", fake_validate)
    config = dataclasses.replace(QUICK, steps=6, eval_every=2)
    expert, result = train_expert(model, tokenizer, [toy_task], "toy", config,
                                  show_progress=False)
    assert result.best_step == 4 and result.best_valid_loss == 1.0
    for key, value in snapshots[1.0].items():
        torch.testing.assert_close(expert.weights[key], value)


def test_training_is_reproducible(tiny, toy_task):
    model, tokenizer = tiny
    first, _ = train_expert(model, tokenizer, [toy_task], "a", QUICK, show_progress=False)
    second, _ = train_expert(model, tokenizer, [toy_task], "b", QUICK, show_progress=False)
    other, _ = train_expert(model, tokenizer, [toy_task], "c",
                            dataclasses.replace(QUICK, seed=7), show_progress=False)
    for key in first.weights:
        assert torch.equal(first.weights[key], second.weights[key])
    assert any(not torch.equal(first.weights[k], other.weights[k]) for k in first.weights)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny, toy_task, tmp_path, monkeypatch):
    model, tokenizer = tiny
    library = new_library(tmp_path / "lib", model)
    config = dataclasses.replace(QUICK, steps=8, eval_every=3)
    uninterrupted, _ = train_expert(model, tokenizer, [toy_task], "x", config,
                                    show_progress=False)
    real_factor = training.loop._lr_factor

    def crash_at_step_7(step, steps, warmup):
        if step == 7:
            raise KeyboardInterrupt
        return real_factor(step, steps, warmup)

    monkeypatch.setattr(training.loop, "_lr_factor", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_expert(model, tokenizer, [toy_task], "x", config,
                     run_state=library.run_state("x"), show_progress=False)
    saved = library.run_state("x").read()
    assert saved is not None and saved[1]["step"] == 6
    assert not any("lora" in n for n, _ in model.named_modules())  # unwrapped even on a crash
    monkeypatch.setattr(training.loop, "_lr_factor", real_factor)
    resumed, result = train_expert(model, tokenizer, [toy_task], "x", config,
                                   run_state=library.run_state("x"), show_progress=False)
    for key in uninterrupted.weights:
        torch.testing.assert_close(resumed.weights[key], uninterrupted.weights[key],
                                   rtol=0, atol=0)
    assert library.run_state("x").read() is not None  # its caller clears it once stored
    assert result.steps == 8


def test_resuming_with_another_config_is_refused(tiny, toy_task, tmp_path, monkeypatch):
    model, tokenizer = tiny
    library = new_library(tmp_path / "lib", model)
    monkeypatch.setattr(training.loop, "_lr_factor", _crash_after(4))
    with pytest.raises(KeyboardInterrupt):
        train_expert(model, tokenizer, [toy_task], "x", dataclasses.replace(QUICK, eval_every=2),
                     run_state=library.run_state("x"), show_progress=False)
    monkeypatch.undo()
    with pytest.raises(QuiverError, match="another config"):
        train_expert(model, tokenizer, [toy_task], "x", dataclasses.replace(QUICK, rank=8),
                     run_state=library.run_state("x"), show_progress=False)


def _crash_after(n):
    real = training.loop._lr_factor

    def factor(step, steps, warmup):
        if step >= n:
            raise KeyboardInterrupt
        return real(step, steps, warmup)

    return factor


def test_several_tasks_train_one_multitask_expert(tiny):
    model, tokenizer = tiny
    tasks = [make_task("toy:a", 30), make_task("toy:b", 30)]
    config = dataclasses.replace(QUICK, epochs=1.0, batch_size=7)
    expert, result = train_expert(model, tokenizer, tasks, "ab", config, show_progress=False)
    assert expert.info.tasks == ["toy:a", "toy:b"]
    assert expert.info.training["train_examples"] == 2 * 21  # 70% of each task
    assert result.steps == 6  # ceil(42 / 7)


def test_unknown_target_module_is_a_clear_error(tiny, toy_task):
    model, tokenizer = tiny
    config = dataclasses.replace(QUICK, target_modules=("q_proj", "w_in"))
    with pytest.raises(QuiverError, match="target-module mismatch: this llama model has no "
                       "linear layer named w_in; its linear layers are down_proj, .*q_proj.* "
                       r"\(choose with --target-modules, or all-linear"):
        train_expert(model, tokenizer, [toy_task], "x", config, show_progress=False)


def test_all_linear_finds_each_architectures_own_layers_conv1d_included():
    """The default targets are the model's own linear layers (GPT-2's are Conv1D, their
    weight stored (in, out)), never the output head; Llama's are the seven of before."""
    from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

    from quiver.models import linear_module_shapes

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                      n_positions=32))
    assert model_targets(gpt2, ("all-linear",)) == ("c_attn", "c_fc", "c_proj")
    assert linear_module_shapes(gpt2)["transformer.h.0.attn.c_attn"] == [32, 96]
    assert "lm_head" not in linear_module_shapes(gpt2)
    phi = PhiForCausalLM(PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=64))
    assert model_targets(phi, ("ALL-LINEAR",)) == ("dense", "fc1", "fc2", "k_proj", "q_proj",
                                                   "v_proj")
    assert set(TrainConfig().target_modules) == {"all-linear"}


def test_a_task_without_training_examples_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(QuiverError, match="no training examples"):
        train_expert(model, tokenizer, [make_task("toy:none", 0)], "x", QUICK, show_progress=False)


def test_train_config_round_trips_through_json_and_validates():
    from quiver.config import from_dict, to_dict

    config = TrainConfig(rank=8, target_modules=("q_proj", "v_proj"), micro_batch_tokens=1024,
                         gradient_checkpointing="on")
    assert from_dict(TrainConfig, to_dict(config)) == config
    with pytest.raises(QuiverError, match="no field"):
        from_dict(TrainConfig, {"rnak": 3})
    with pytest.raises(QuiverError, match="invalid TrainConfig"):
        from_dict(TrainConfig, {"rank": 0})
    with pytest.raises(QuiverError, match="gradient_checkpointing"):
        from_dict(TrainConfig, {"gradient_checkpointing": "sometimes"})
    with pytest.raises(QuiverError, match="micro_batch_tokens"):
        from_dict(TrainConfig, {"micro_batch_tokens": -1})


@pytest.mark.integration
def test_real_model_trains_on_a_real_gym_task():
    from quiver.data import load_task
    from quiver.models import load_base

    model, tokenizer = load_base("smollm2-135m", device="cpu")
    task = load_task("gym:spell_backward?size=200")
    config = TrainConfig(steps=4, eval_every=2, batch_size=4, max_length=128, eval_examples=16,
                         lr=1e-3)
    expert, result = train_expert(model, tokenizer, [task], "spell", config, show_progress=False)
    assert result.tokens > 0 and len(expert.lora_factors()) == 30 * 7
    assert result.history[-1]["valid_loss"] < result.history[0]["valid_loss"] + 0.5


# ------------------------------------------------------------------ memory: parts, checkpointing
def _examples(tokenizer, n=8):
    """Examples of different lengths, so parts differ in width and padding matters."""
    from quiver.data import Example

    return [tokenize_example(tokenizer, Example("Say it " + "again " * (i % 5) + f"{i}:", f" {i}"),
                             64) for i in range(n)]


@contextlib.contextmanager
def _lora(model, dropout=0.0):
    """The tiny model with LoRA, B initialised away from zero so that every factor gets a
    gradient; unwrapped (and put back in its mode, unfrozen) afterwards."""
    with restored(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = dataclasses.replace(QUICK, dropout=dropout)
        peft_model = wrap_with_lora(model, config,
                                              model_targets(model, config.target_modules))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
        try:
            yield peft_model
        finally:
            peft_model.unload()


def _gradients(peft_model, run) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    run()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad(set_to_none=True)
    return grads


def test_micro_batches_hold_at_most_the_budget_and_every_example(tiny):
    _, tokenizer = tiny
    examples = _examples(tokenizer, 11)
    assert micro_batches(examples, 0) == [examples]
    assert micro_batches(examples, 10_000) == [examples]  # within the budget: as it was
    for budget in (1, 20, 37, 60):
        parts = micro_batches(examples, budget)
        assert sorted(map(id, sum(parts, []))) == sorted(map(id, examples))
        for part in parts:
            width = max(len(e) for e in part)
            assert width * len(part) <= budget or len(part) == 1
    assert len(micro_batches(examples, 1)) == len(examples)


def test_gradients_accumulated_in_parts_equal_the_whole_batch_gradient(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    assert len(micro_batches(examples, 40)) >= 3
    with _lora(model) as peft_model:
        peft_model.train()
        base = peft_model.get_base_model()
        pad = tokenizer.pad_token_id
        whole = _gradients(peft_model, lambda: accumulate_gradients(base, examples, pad))
        parts = _gradients(peft_model, lambda: accumulate_gradients(base, examples, pad, 40))
    assert len(whole) == 2 * 2 * 7 and all(g.abs().sum() > 0 for g in whole.values())
    for name in whole:  # float32 sums in another order: equal to ~1e-6 of the largest entry
        scale = whole[name].abs().max().item()
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-5 * scale)


def test_training_in_parts_gives_the_weights_of_whole_batches(tiny, toy_task):
    model, tokenizer = tiny
    config = dataclasses.replace(QUICK, dropout=0.0, steps=3, eval_every=3, eval_examples=4)
    whole, whole_result = train_expert(model, tokenizer, [toy_task], "w", config,
                                       show_progress=False)
    parted, result = train_expert(model, tokenizer, [toy_task], "p",
                                  dataclasses.replace(config, micro_batch_tokens=16),
                                  show_progress=False)
    assert whole_result.memory.micro_batch_tokens == 0 and result.memory.micro_batch_tokens == 16
    assert parted.info.training["memory"]["micro_batch_tokens"] == 16
    assert result.tokens == whole_result.tokens
    for key in whole.weights:
        torch.testing.assert_close(parted.weights[key], whole.weights[key], rtol=1e-5, atol=1e-6)


def test_checkpointing_keeps_the_gradients_and_leaves_the_model_as_found(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    forwards = []
    with _lora(model, dropout=0.2) as peft_model:  # dropout: the recompute must replay masks
        peft_model.train()
        base = peft_model.get_base_model()
        hook = base.model.layers[0].mlp.register_forward_pre_hook(lambda *_: forwards.append(1))
        plain = _gradients(peft_model,
                           lambda: accumulate_gradients(base, examples, tokenizer.pad_token_id))
        with gradient_checkpointing(model):
            checkpointed = _gradients(
                peft_model, lambda: accumulate_gradients(base, examples, tokenizer.pad_token_id))
        hook.remove()
    assert len(forwards) == 1 + 2  # the checkpointed layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * 7
    for name in plain:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-5 * scale)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not getattr(model, "_require_grads_hooks", None)
    assert not model.get_input_embeddings()._forward_hooks


def test_auto_memory_plan_splits_then_checkpoints_as_memory_shrinks(tiny, monkeypatch):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    widest = max(len(e) for e in examples)
    config = dataclasses.replace(QUICK, batch_size=8)
    share = sum(len(e) - e.n_prompt for e in examples) / sum(len(e) for e in examples)
    per_token = training.activation_bytes_per_token(model, False, share)
    assert per_token > training.activation_bytes_per_token(model, True, share)

    def plan_with(free_bytes, **overrides):
        monkeypatch.setattr(training.memory, "available_memory", lambda device: int(free_bytes))
        return plan_memory(model, examples, dataclasses.replace(config, **overrides))

    plenty = plan_with(1e12)
    assert (plenty.micro_batch_tokens, plenty.gradient_checkpointing) == (0, False)
    assert not plenty.lean_allocator  # glibc's own allocator is faster where memory allows
    rows = plan_with(2 * 3 * widest * per_token)  # half the free memory: about 3 rows
    assert widest <= rows.micro_batch_tokens < 8 * widest and not rows.gradient_checkpointing
    tight = plan_with(widest * per_token)  # one row would not fit without checkpointing
    assert tight.gradient_checkpointing and tight.micro_batch_tokens >= widest
    assert tight.lean_allocator  # and freed activations go back to the system
    assert plan_with(1e12, gradient_checkpointing="on").gradient_checkpointing
    assert not plan_with(1, gradient_checkpointing="off").gradient_checkpointing
    assert plan_with(1, micro_batch_tokens=100).micro_batch_tokens == 100
    # a resumed run keeps the choices it started with, whatever is free now
    resumed = plan_memory(model, examples, config, previous=dataclasses.asdict(rows))
    assert resumed.micro_batch_tokens == rows.micro_batch_tokens


def test_a_run_resumes_with_other_memory_settings(tiny, toy_task, tmp_path, monkeypatch):
    model, tokenizer = tiny
    library = new_library(tmp_path / "lib", model)
    config = dataclasses.replace(QUICK, steps=4, eval_every=2, eval_examples=4)
    monkeypatch.setattr(training.loop, "_lr_factor", _crash_after(2))
    with pytest.raises(KeyboardInterrupt):
        train_expert(model, tokenizer, [toy_task], "x", config,
                     run_state=library.run_state("x"), show_progress=False)
    monkeypatch.undo()
    _, result = train_expert(model, tokenizer, [toy_task], "x",
                             dataclasses.replace(config, micro_batch_tokens=20,
                                                 gradient_checkpointing="on"),
                             run_state=library.run_state("x"), show_progress=False)
    assert result.steps == 4 and result.history[0]["step"] == 2  # resumed, not restarted
    assert result.memory.micro_batch_tokens == 20 and result.memory.gradient_checkpointing
