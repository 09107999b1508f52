from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.train_config import TrainConfig
from runner.datasets import Dataset, Tokenization, load_dataset
from runner.trainer import TrainCallbacks, train
from tests.runner.data import chat_lines

TINY_DIR = "tuneworks--tiny-random-llama"


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return models_dir / TINY_DIR


@pytest.fixture(scope="module")
def dataset(tiny: Path) -> Dataset:
    from transformers import AutoTokenizer

    return load_dataset(chat_lines(8), Tokenization(AutoTokenizer.from_pretrained(tiny)))


class Recorder(TrainCallbacks):
    def __init__(self, stop_after: int | None = None, reason: str = "pause") -> None:
        self.steps: list[dict[str, Any]] = []
        self.checkpoints: list[tuple[int, int, list[str]]] = []
        self.states: list[int] = []
        self.stop_after, self.reason = stop_after, reason

    def on_step(self, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        self.steps.append(dict(metrics, total_steps=total_steps))

    def on_checkpoint(self, step: int, epoch: int, adapter_dir: Path) -> None:
        self.checkpoints.append((step, epoch, sorted(p.name for p in adapter_dir.iterdir())))

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        self.states.append(step)

    def should_stop(self):  # type: ignore[no-untyped-def]
        if self.stop_after is not None and len(self.steps) >= self.stop_after:
            return self.reason
        return None


def config(tiny: Path, out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "n_epochs": 2,
        "batch_size": 2,
        "threads": 1,
        "seed": 7,
        "resume_state_seconds": 1e9,
    }
    values.update(overrides)
    return TrainConfig(model_path=tiny, output_dir=out, **values)


@pytest.mark.timeout(120)
def test_trainer_learns_a_fixed_answer(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = load_dataset(chat_lines(20), Tokenization(AutoTokenizer.from_pretrained(tiny)))
    recorder = Recorder()
    result = train(
        config(tiny, tmp_path, n_epochs=10, batch_size=4, base_learning_rate=1e-2), data, callbacks=recorder
    )
    first, last = recorder.steps[0], recorder.steps[-1]
    assert result.step == result.total_steps == 50 and result.stopped is None
    # A random 64-wide model can hardly sharpen its (tied, frozen) output layer, so the loss falls by about one
    # nat while the answer tokens go from never to almost always predicted.
    assert first["train_mean_token_accuracy"] < 0.2 and last["train_mean_token_accuracy"] > 0.8
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert result.adapter_dir is not None
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in result.adapter_dir.iterdir()
    }
    assert result.trained_tokens == data.n_tokens * 10
    assert [c[:2] for c in recorder.checkpoints] == [(5 * e, e) for e in range(1, 11)]


@pytest.mark.timeout(120)
def test_same_seed_same_losses_other_seed_other_losses(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    runs = []
    for index, seed in enumerate([7, 7, 8]):
        recorder = Recorder()
        train(config(tiny, tmp_path / str(index), seed=seed), dataset, callbacks=recorder)
        runs.append([s["train_loss"] for s in recorder.steps])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.timeout(120)
def test_resumed_run_reproduces_the_uninterrupted_run(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    whole = Recorder()
    train(config(tiny, tmp_path / "whole"), dataset, valid_set=dataset, callbacks=whole)
    first = Recorder(stop_after=3)
    paused = train(config(tiny, tmp_path / "first"), dataset, valid_set=dataset, callbacks=first)
    assert paused.stopped == "pause" and paused.step == 3 and paused.adapter_dir is None
    assert first.states == [3]
    state = tmp_path / "first" / "state-3"
    second = Recorder()
    resumed = train(
        config(tiny, tmp_path / "second"), dataset, valid_set=dataset, callbacks=second, resume=state
    )
    assert [s["step"] for s in second.steps] == [4, 5, 6, 7, 8]
    assert resumed.step == 8 and len(resumed.history) == 8
    expected = [s["train_loss"] for s in whole.steps]
    got = [s["train_loss"] for s in first.steps + second.steps]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert second.steps[-1]["full_valid_loss"] == pytest.approx(whole.steps[-1]["full_valid_loss"], rel=1e-4)


def test_cancel_stops_without_state(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    recorder = Recorder(stop_after=2, reason="cancel")
    result = train(config(tiny, tmp_path), dataset, callbacks=recorder)
    assert result.stopped == "cancel" and result.step == 2 and recorder.states == []


def test_validation_metrics_at_intervals_and_epoch_end(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    recorder = Recorder()
    train(config(tiny, tmp_path, eval_interval=3), dataset, valid_set=dataset, callbacks=recorder)
    with_valid = [s["step"] for s in recorder.steps if "valid_loss" in s]
    with_full = [s["step"] for s in recorder.steps if "full_valid_loss" in s]
    assert with_valid == [3, 4, 6, 8] and with_full == [4, 8]
    assert all(0 <= s["train_mean_token_accuracy"] <= 1 and s["tokens"] > 0 for s in recorder.steps)


def test_adapter_config_names_the_base_model(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    result = train(config(tiny, tmp_path, n_epochs=1, base_model_name="org/base"), dataset)
    assert result.adapter_dir is not None
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/base"
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_qlora_on_cpu_is_a_clear_error(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`qlora`.*CUDA"):
        train(config(tiny, tmp_path, qlora=True, device="cpu"), dataset)


def test_config_checks_name_the_field(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`schedule`"):
        config(tiny, tmp_path, schedule="step")
    with pytest.raises(ValueError, match="`lora_dropout`"):
        config(tiny, tmp_path, lora_dropout=1.5)
