"""The trainer's fast path (fused LoRA layers) learns what peft's own forward learns, on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.train_config import TrainConfig
from runner.batching import collate, fuse_lora, label_loss
from runner.datasets import Dataset, Tokenization, load_dataset
from runner.trainer import load_model, train
from tests.runner.data import chat_lines
from tests.runner.test_trainer import TINY_DIR, Recorder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return models_dir / TINY_DIR


@pytest.fixture(scope="module")
def dataset(tiny: Path) -> Dataset:
    from transformers import AutoTokenizer

    return load_dataset(chat_lines(8), Tokenization(AutoTokenizer.from_pretrained(tiny)))


def _config(tiny: Path, out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "n_epochs": 2,
        "batch_size": 2,
        "threads": 1,
        "seed": 7,
        "resume_state_seconds": 1e9,
    }
    values.update(overrides)
    return TrainConfig(model_path=tiny, output_dir=out, **values)


def _loss_and_grads(model: Any, batch: Any) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = label_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize(("dtype", "rel"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_fused_layers_give_peft_loss_and_gradients(
    tiny: Path, dataset: Dataset, tmp_path: Path, dtype: str, rel: float
) -> None:
    models = []
    for fused in (False, True):
        model = load_model(_config(tiny, tmp_path, dtype=dtype, lora_dropout=0.0, fused_lora=fused), CPU)
        with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: give it values
            generator = torch.Generator().manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        models.append(model.train())
    routed = sum(1 for m in models[1].modules() if m.forward.__func__.__name__ == "_fused_forward")  # type: ignore[union-attr]
    assert routed == 7 * models[1].config.num_hidden_layers  # every projection of every layer
    batch = collate(dataset.examples[:4], pad_id=0, device=CPU)
    (plain_loss, plain_grads), (fused_loss, fused_grads) = (_loss_and_grads(m, batch) for m in models)
    assert fused_loss == pytest.approx(plain_loss, rel=rel)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 2 * routed
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == torch.float32  # LoRA weights and their gradients stay fp32
        scale = float(grad.abs().max())
        assert scale > 0, name
        assert float((fused_grads[name] - grad).abs().max()) <= 10 * rel * scale, name


def test_fast_path_learns_the_plain_path_loss_curve(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    curves = []
    for fused in (False, True):
        recorder = Recorder()
        config = _config(
            tiny, tmp_path / str(fused), lora_dropout=0.0, fused_lora=fused, base_learning_rate=1e-2
        )
        train(config, dataset, callbacks=recorder)
        curves.append([s["train_loss"] for s in recorder.steps])
    plain, fused_curve = curves
    assert len(plain) == len(fused_curve) == 8
    assert plain[-1] < plain[0]  # it learns: the comparison is not between two flat curves
    # bf16 products in both paths; the fused one rounds the LoRA update once more, hence the tolerance.
    assert fused_curve == pytest.approx(plain, rel=2e-2)


def test_fused_dropout_drops_in_training_only(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    model = load_model(_config(tiny, tmp_path, dtype="float32", lora_dropout=0.5), CPU)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    batch = collate(dataset.examples[:2], pad_id=0, device=CPU)
    with torch.no_grad():
        model.eval()
        evals = [float(label_loss(model, batch)[0]) for _ in range(2)]
        model.train()
        trains = [float(label_loss(model, batch)[0]) for _ in range(2)]
    assert evals[0] == evals[1]  # no dropout in eval mode
    assert trains[0] != trains[1] and trains[0] != evals[0]  # a fresh mask in every training forward


def test_fuse_lora_leaves_disabled_adapters_to_peft(tiny: Path, dataset: Dataset, tmp_path: Path) -> None:
    model = load_model(_config(tiny, tmp_path, dtype="float32", lora_dropout=0.0), CPU).eval()
    assert fuse_lora(model) == 7 * model.config.num_hidden_layers  # routing twice is harmless
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
        batch = collate(dataset.examples[:2], pad_id=0, device=CPU)
        with_adapter = float(label_loss(model, batch)[0])
        with model.disable_adapter():
            without = float(label_loss(model, batch)[0])
        base = load_model(_config(tiny, tmp_path, dtype="float32", lora_dropout=0.0, fused_lora=False), CPU)
        with base.disable_adapter():
            reference = float(label_loss(base.eval(), batch)[0])
    assert without == pytest.approx(reference, rel=1e-6)
    assert with_adapter != pytest.approx(without, rel=1e-3)
