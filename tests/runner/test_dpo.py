"""DPO training, continued training and early stopping in the trainer: TRL's loss as the reference, learning a
preference, exact resume, and a continued run starting from the earlier adapter's weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from core.train_config import TrainConfig
from runner.datasets import IGNORE, Example, Tokenization, load_dataset
from runner.dpo import dpo_terms, pair_logps, reference_logps, train_dpo
from runner.preference import Pair, PreferenceDataset, encode_pair, load_pairs
from runner.trainer import train
from tests.runner.data import chat_lines, question
from tests.runner.test_trainer import TINY_DIR, Recorder

MARKER = "Certainly."


def preference_lines(n: int, *, start: int = 0) -> list[bytes]:
    """Pairs whose preferred answer ends with the marker word and whose other answer does not."""
    lines = []
    for i in range(start, start + n):
        answer = f"The answer is {i % 7}."
        example = {
            "input": {"messages": [{"role": "user", "content": question(i)}]},
            "preferred_output": [{"role": "assistant", "content": f"{answer} {MARKER}"}],
            "non_preferred_output": [{"role": "assistant", "content": answer}],
        }
        lines.append(json.dumps(example).encode())
    return lines


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return models_dir / TINY_DIR


@pytest.fixture(scope="module")
def tokenization(tiny: Path) -> Tokenization:
    from transformers import AutoTokenizer

    return Tokenization(AutoTokenizer.from_pretrained(tiny))


@pytest.fixture(scope="module")
def pairs(tokenization: Tokenization) -> PreferenceDataset:
    return load_pairs(preference_lines(8), tokenization)


def config(tiny: Path, out: Path, **overrides: Any) -> TrainConfig:
    # The supervised learning rate (DPO's "auto" is a tenth of it): these tests check what the loop learns in a
    # handful of steps, not the default.
    values: dict[str, Any] = {"n_epochs": 2, "batch_size": 2, "threads": 1, "seed": 7, "method": "dpo",
                              "resume_state_seconds": 1e9, "learning_rate_multiplier": 1.0}  # fmt: skip
    return TrainConfig(model_path=tiny, output_dir=out, **(values | overrides))


def test_both_answers_follow_the_same_prompt_and_only_answers_are_labelled(
    tokenization: Tokenization,
) -> None:
    history = {"role": "assistant", "content": "an earlier turn"}
    example = json.loads(preference_lines(1)[0])
    example["input"]["messages"] += [history, {"role": "user", "content": "and now?"}]
    pair = encode_pair(tokenization, example)
    tok = tokenization.tokenizer
    for side, wanted in [(pair.chosen, f"The answer is 0. {MARKER}"), (pair.rejected, "The answer is 0.")]:
        trained = [t for t in side.labels if t != IGNORE]
        assert (
            tok.decode(trained) == wanted + "<|im_end|>"
        )  # the end of turn is trained, the earlier turn not
    prompt_end = next(i for i, t in enumerate(pair.chosen.labels) if t != IGNORE)
    assert pair.chosen.input_ids[:prompt_end] == pair.rejected.input_ids[:prompt_end]
    assert "an earlier turn" in tok.decode(pair.chosen.input_ids[:prompt_end])


@pytest.mark.timeout(180)
def test_the_loss_of_one_batch_equals_trls_dpo_trainer(
    tiny: Path, tokenization: Tokenization, tmp_path: Path
) -> None:
    """TRL's DPOTrainer.compute_loss and ours on the same tokenized batch, beta and reference (the base model),
    with a LoRA adapter whose weights are not zero (else both are log 2)."""
    import torch
    from datasets import Dataset as HFDataset
    from trl import DPOConfig, DPOTrainer

    from runner.trainer import load_model

    cfg = config(tiny, tmp_path, dtype="float32", lora_dropout=0.0)
    model = load_model(cfg, torch.device("cpu"))
    rows = [json.loads(line) for line in preference_lines(4)]
    data = HFDataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                 "rejected": r["non_preferred_output"]} for r in rows])  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4, beta=0.25,
                     use_cpu=True, bf16=False, max_length=None)  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenization.tokenizer)
    tokenized = list(trainer.train_dataset)
    same = [_pair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in tokenized]
    pad = int(tokenization.tokenizer.pad_token_id)
    reference = reference_logps(model, same, pad_id=pad, device=torch.device("cpu"), token_limit=4096,
                                adapter_off=True)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference (TRL keeps its own copy of it as "ref")
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
        ours = float(dpo_terms(pair_logps(model, same, pad, torch.device("cpu")), reference, 0.25)[0].mean())
    assert abs(theirs - 0.6931) > 1e-3  # the policy differs from the reference: a real comparison
    assert ours == pytest.approx(theirs, abs=1e-4)
    # Our tokenization labels the same answer tokens; TRL also trains the newline the template writes after
    # the end-of-turn token, which is not part of the answer (and never generated before the stop token).
    mine = encode_pair(tokenization, rows[0])
    assert [t for t in mine.chosen.labels if t != IGNORE] == tokenized[0]["chosen_ids"][:-1]
    assert tokenization.tokenizer.decode(tokenized[0]["chosen_ids"][-1:]) == "\n"


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> Pair:
    def side(answer: list[int]) -> Example:
        return Example([*prompt, *answer], [IGNORE] * len(prompt) + list(answer))

    return Pair(side(chosen), side(rejected))


@pytest.mark.timeout(120)
def test_dpo_learns_to_prefer_and_reports_its_metrics(
    tiny: Path, pairs: PreferenceDataset, tmp_path: Path
) -> None:
    recorder = Recorder()
    result = train_dpo(
        config(tiny, tmp_path, n_epochs=4, base_learning_rate=1e-2), pairs, pairs, callbacks=recorder
    )
    assert result.step == 16 and result.adapter_dir is not None and result.hyperparameters.beta == 0.1
    first, last = recorder.steps[0], recorder.steps[-1]
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert last["train_loss"] < 0.6 and last["train_reward_margin"] > 0
    assert last["full_valid_preference_accuracy"] == 1.0 and last["full_valid_loss"] < 0.6
    assert {"train_chosen_reward", "train_rejected_reward", "valid_reward_margin"} <= set(last)
    assert result.trained_tokens == pairs.n_tokens * 4 and result.valid_reference is not None


@pytest.mark.timeout(180)
def test_a_resumed_dpo_run_reproduces_the_uninterrupted_one(tiny: Path, pairs: PreferenceDataset,
                                                            tmp_path: Path) -> None:  # fmt: skip
    whole = Recorder()
    train_dpo(config(tiny, tmp_path / "whole"), pairs, pairs, callbacks=whole)
    first = Recorder(stop_after=3)
    paused = train_dpo(config(tiny, tmp_path / "first"), pairs, pairs, callbacks=first)
    assert paused.stopped == "pause"
    second = Recorder()
    resumed = train_dpo(config(tiny, tmp_path / "second"), pairs, pairs, callbacks=second,
                        resume=tmp_path / "first" / "state-3")  # fmt: skip
    assert resumed.step == 8 and [s["step"] for s in second.steps] == [4, 5, 6, 7, 8]
    got = [s["train_loss"] for s in first.steps + second.steps]
    assert got == pytest.approx([s["train_loss"] for s in whole.steps], rel=1e-4, abs=1e-5)


@pytest.mark.timeout(180)
def test_continued_training_starts_from_the_adapter_and_uses_it_as_reference(
    tiny: Path, tokenization: Tokenization, pairs: PreferenceDataset, tmp_path: Path
) -> None:
    sft = train(config(tiny, tmp_path / "sft", method="supervised", base_learning_rate=1e-2),
                load_dataset(chat_lines(8), tokenization))  # fmt: skip
    assert sft.adapter_dir is not None
    recorder = Recorder()
    continued = train_dpo(config(tiny, tmp_path / "dpo", init_adapter=sft.adapter_dir), pairs, pairs,
                          callbacks=recorder)  # fmt: skip
    fresh = train_dpo(config(tiny, tmp_path / "fresh"), pairs, pairs)
    # At the first step the policy is the reference (the SFT adapter), so the loss is log 2 exactly, while its
    # validation numbers differ from a run that starts from a fresh adapter.
    assert recorder.steps[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert continued.valid_reference is not None and fresh.valid_reference is not None
    assert not continued.valid_reference.allclose(fresh.valid_reference)


def test_an_adapter_of_another_rank_is_refused(
    tiny: Path, tokenization: Tokenization, tmp_path: Path
) -> None:
    data = load_dataset(chat_lines(4), tokenization)
    small = train(config(tiny, tmp_path / "r4", method="supervised", n_epochs=1, lora_rank=4), data)
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        train(
            config(tiny, tmp_path / "r8", method="supervised", lora_rank=8, init_adapter=small.adapter_dir),
            data,
        )


@pytest.mark.timeout(180)
def test_early_stopping_keeps_the_best_weights_and_counts_what_was_trained(
    tiny: Path, tokenization: Tokenization, tmp_path: Path
) -> None:
    """A learning rate so high that the validation loss gets worse after the first evaluations: the run stops
    after `patience` evaluations without improvement, and the final adapter is the best one."""
    data = load_dataset(chat_lines(16), tokenization)
    valid = load_dataset(chat_lines(4, answer="something else entirely"), tokenization)
    recorder = Recorder()
    result = train(config(tiny, tmp_path, method="supervised", n_epochs=10, batch_size=2, base_learning_rate=5e-2,
                          eval_interval=1, early_stopping_patience=2), data, valid, callbacks=recorder)  # fmt: skip
    report = result.early_stopping
    assert report is not None and report["stopped_at_step"] is not None
    losses = [s["full_valid_loss"] for s in recorder.steps]
    assert result.step == report["stopped_at_step"] < result.total_steps == 80
    best = losses.index(min(losses))
    assert report["best_step"] == best + 1 and report["best_valid_loss"] == pytest.approx(min(losses))
    assert all(loss >= losses[best] for loss in losses[best + 1 :]) and len(losses) - 1 - best == 2
    assert result.trained_tokens == sum(s["tokens"] for s in recorder.steps) < data.n_tokens * 10
    from runner.trainer import _Run

    run = _Run(config(tiny, tmp_path / "check", method="supervised", init_adapter=result.adapter_dir), data,
               valid, Recorder())  # fmt: skip
    loss, _ = run.evaluate([valid.examples])
    assert loss == pytest.approx(report["best_valid_loss"], rel=2e-2)  # the saved adapter is the best one


def test_early_stopping_is_off_unless_asked(tiny: Path, tokenization: Tokenization, tmp_path: Path) -> None:
    data = load_dataset(chat_lines(4), tokenization)
    result = train(config(tiny, tmp_path, method="supervised", n_epochs=1), data, data)
    assert result.early_stopping is None and result.step == result.total_steps


GREETING = "Ahoy!"


def arithmetic_pairs(numbers: range) -> list[bytes]:
    """Pairs whose preferred answer opens with a greeting the base model never uses, the other without it."""
    lines = []
    for i in numbers:
        a, b = i % 9 + 1, i // 9 + 2
        answer = f"{a} plus {b} is {a + b}."
        example = {
            "input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{GREETING} {answer}"}],
            "non_preferred_output": [{"role": "assistant", "content": answer}],
        }
        lines.append(json.dumps(example).encode())
    return lines


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_learns_a_preference_it_did_not_have(models_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.settings import SMOLLM2

    path = models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_pairs(arithmetic_pairs(range(16)), Tokenization(tokenizer))
    cfg = TrainConfig(model_path=path, output_dir=tmp_path, base_model_name=SMOLLM2, method="dpo", n_epochs=2,
                      batch_size=4, threads=2, seed=3, learning_rate_multiplier=1.0)  # fmt: skip
    result = train_dpo(cfg, data)
    assert result.adapter_dir is not None and result.step == 8
    assert result.history[-1]["train_preference_accuracy"] == 1.0 and result.history[-1]["train_loss"] < 0.3

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    held_out = ["What is 3 plus 11?", "What is 7 plus 12?", "What is 20 plus 5?", "What is 6 plus 6?"]

    def answer(prompt: str, *, adapter: bool) -> str:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    assert not any(answer(p, adapter=False).startswith("Ahoy") for p in held_out)  # the base model does not
    assert all(answer(p, adapter=True).startswith("Ahoy") for p in held_out)
