"""The job spec: the one interpretation of a job's method, hyperparameters and LoRA settings, API to worker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from core.failures import JobFailure
from core.hyperparameters import Hyperparameters
from core.job_spec import LORA_ALPHA, LORA_DROPOUT, LORA_RANK, JobSpec
from core.settings import Settings

AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


def request(**fields: object) -> JobSpec:
    values: dict = {"method": None, "hyperparameters": None, "lora": None, "seed": 7, "max_lora_rank": 64}
    return JobSpec.from_request(**(values | fields))


def test_a_bare_request_is_supervised_with_auto_hyperparameters_and_default_lora() -> None:
    spec = request()
    assert spec.method == "supervised" and spec.hyperparameters == AUTO and spec.seed == 7
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (LORA_RANK, LORA_ALPHA, LORA_DROPOUT)
    columns = spec.columns()
    assert columns["method"] == {"type": "supervised", "supervised": {"hyperparameters": AUTO}}
    assert columns["hyperparameters"] == AUTO and columns["lora"] == {}


def test_deprecated_hyperparameters_are_mirrored_into_the_method() -> None:
    asked = AUTO | {"n_epochs": 2}
    spec = request(hyperparameters=asked)
    assert spec.columns()["method"]["supervised"]["hyperparameters"] == asked


def test_hyperparameters_that_disagree_with_the_method_name_the_field() -> None:
    method = {"type": "supervised", "supervised": {"hyperparameters": AUTO | {"n_epochs": 3}}}
    with pytest.raises(JobFailure) as info:
        request(method=method, hyperparameters=AUTO | {"n_epochs": 2})
    assert info.value.param == "hyperparameters"


@pytest.mark.parametrize("kind", ["dpo", "reinforcement"])
def test_methods_the_trainer_lacks_are_refused_at_method_type(kind: str) -> None:
    with pytest.raises(JobFailure) as info:
        request(method={"type": kind})
    assert info.value.param == "method.type"


def test_a_rank_above_what_the_servers_load_is_refused() -> None:
    with pytest.raises(JobFailure) as info:
        request(lora={"rank": 128}, max_lora_rank=64)
    assert info.value.param == "lora.rank" and "128" in info.value.message


def test_the_row_gives_back_the_same_spec_and_the_worker_config() -> None:
    spec = request(method={"type": "supervised", "supervised": {"hyperparameters": AUTO | {"batch_size": 4}}},
                   lora={"rank": 8, "alpha": 12.5, "target_modules": ["q_proj"]})  # fmt: skip
    row = SimpleNamespace(**spec.columns(), seed=spec.seed)
    again = JobSpec.from_row(row)
    assert again == spec
    config = again.train_config(settings=Settings(train_threads=1), model_path=Path("/m"), output_dir=Path("/o"),
                                base_model_name="base")  # fmt: skip
    assert (config.batch_size, config.n_epochs, config.seed) == (4, "auto", 7)
    assert (config.lora_rank, config.lora_alpha, config.target_modules) == (8, 12.5, ["q_proj"])
    assert config.threads == 1 and config.base_model_name == "base"


def test_resolved_hyperparameters_are_written_back_in_both_places() -> None:
    columns = request().resolved_columns(
        Hyperparameters(n_epochs=3, batch_size=2, learning_rate_multiplier=1.0)
    )
    numbers = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert columns == {"method": {"type": "supervised", "supervised": {"hyperparameters": numbers}},
                       "hyperparameters": numbers}  # fmt: skip


def test_a_stored_method_the_worker_cannot_train_fails_with_unsupported_method() -> None:
    row = SimpleNamespace(method={"type": "dpo"}, hyperparameters={}, lora={}, seed=0)
    with pytest.raises(JobFailure) as info:
        JobSpec.from_row(row)
    assert (info.value.code, info.value.param) == ("unsupported_method", "method.type")
