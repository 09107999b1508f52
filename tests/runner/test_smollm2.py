"""End-to-end truth on the real model: SmolLM2 learns a fixed answer, checked by generation with peft."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import SMOLLM2
from core.train_config import TrainConfig
from runner.datasets import Tokenization, load_dataset
from runner.trainer import train
from tests.runner.data import ANSWER, chat_lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_adapter_learns_a_fixed_answer(models_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_dataset(chat_lines(20), Tokenization(tokenizer))
    config = TrainConfig(model_path=path, output_dir=tmp_path, base_model_name=SMOLLM2, n_epochs=3, batch_size=4,
                         threads=1, seed=3)  # fmt: skip
    result = train(config, data)
    assert result.step == 15 and result.adapter_dir is not None
    assert result.history[-1]["train_loss"] < 0.05 < 1.0 < result.history[0]["train_loss"]

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    for prompt in ["Is the service healthy?", "kappa lambda mu, tell me the status please"]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert answer == ANSWER, prompt
    with torch.no_grad(), model.disable_adapter():  # the base model alone does not answer that way
        base_out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    assert (
        tokenizer.decode(base_out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() != ANSWER
    )
