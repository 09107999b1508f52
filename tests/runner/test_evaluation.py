from __future__ import annotations

from pathlib import Path

import pytest

from core.train_config import TrainConfig
from runner.datasets import Tokenization, load_dataset
from runner.evaluation import char_error_rate, evaluate, label_metrics
from runner.trainer import train
from tests.runner.data import chat_lines


def test_char_error_rate() -> None:
    assert char_error_rate("abc", "abc") == 0
    assert char_error_rate("abd", "abc") == pytest.approx(1 / 3)
    assert char_error_rate("", "abcd") == 1
    assert char_error_rate("kitten", "sitting") == pytest.approx(3 / 7)


def test_label_metrics_only_for_small_label_sets() -> None:
    refs = ["yes", "no", "yes", "no", "maybe", "maybe"]
    preds = ["yes", "no", "no", "no", "maybe", "yes"]
    metrics = label_metrics(preds, refs)
    assert metrics["labels"] == ["maybe", "no", "yes"]
    assert metrics["label_accuracy"] == pytest.approx(4 / 6)
    # F1: yes 2*1/(2+1+1)=0.5, no 2*2/(4+1+0)=0.8, maybe 2*1/(2+0+1)=2/3
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert label_metrics(["a", "b"], ["a", "b"]) == {}  # each label seen once: not a label set
    assert label_metrics([str(i) for i in range(50)] * 2, [str(i) for i in range(50)] * 2) == {}


@pytest.mark.timeout(180)
def test_evaluate_after_training(models_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tiny = models_dir / "tuneworks--tiny-random-llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = load_dataset(chat_lines(12, labels=["positive", "negative"]), Tokenization(tokenizer))
    config = TrainConfig(model_path=tiny, output_dir=tmp_path, n_epochs=2, batch_size=4, threads=1)
    result = train(config, data)
    metrics = evaluate(result.model, tokenizer, data, max_generations=6)
    assert metrics["n_examples"] == 12 and metrics["n_generated"] == 6
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert 0 <= metrics["token_accuracy"] <= 1 and 0 <= metrics["exact_match"] <= 1
    assert metrics["character_error_rate"] >= 0
    assert metrics["labels"] == ["negative", "positive"] and 0 <= metrics["macro_f1"] <= 1
