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


@pytest.mark.parametrize("kind", ["reinforcement", "ppo"])
def test_methods_the_trainer_lacks_are_refused_at_method_type(kind: str) -> None:
    with pytest.raises(JobFailure) as info:
        request(method={"type": kind})
    assert info.value.param == "method.type"


def test_a_dpo_request_has_auto_beta_and_writes_resolved_numbers_back() -> None:
    spec = request(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}})
    assert spec.method == "dpo" and spec.hyperparameters == AUTO | {"beta": 0.2, "n_epochs": 2}
    assert request(method={"type": "dpo"}).hyperparameters == AUTO | {"beta": "auto"}
    resolved = Hyperparameters(n_epochs=2, batch_size=1, learning_rate_multiplier=1.0, beta=0.2)
    numbers = {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": 0.2}
    assert spec.resolved_columns(resolved)["method"] == {"type": "dpo", "dpo": {"hyperparameters": numbers}}
    row = SimpleNamespace(**spec.columns(), seed=spec.seed)
    config = JobSpec.from_row(row).train_config(settings=Settings(), model_path=Path("/m"), output_dir=Path("/o"),
                                                base_model_name="base")  # fmt: skip
    assert (config.method, config.beta, config.n_epochs) == ("dpo", 0.2, 2)


@pytest.mark.parametrize("beta", [0, -0.5, "high", True])
def test_a_beta_that_is_not_positive_names_the_field(beta: object) -> None:
    with pytest.raises(JobFailure) as info:
        request(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}})
    assert info.value.param == "method.dpo.hyperparameters.beta"


def test_early_stopping_is_stored_beside_the_hyperparameters_and_reaches_the_trainer() -> None:
    spec = request(early_stopping={"patience": 3, "min_delta": 0.01}, has_validation_file=True)
    columns = spec.columns()
    assert columns["hyperparameters"]["early_stopping"] == {"patience": 3, "min_delta": 0.01}
    assert "early_stopping" not in columns["method"]["supervised"]["hyperparameters"]
    again = JobSpec.from_row(SimpleNamespace(**columns, seed=spec.seed))
    assert again == spec and "early_stopping" not in again.hyperparameters
    config = again.train_config(
        settings=Settings(), model_path=Path("/m"), output_dir=Path("/o"), base_model_name="b"
    )
    assert (config.early_stopping_patience, config.early_stopping_min_delta) == (3, 0.01)
    assert (
        request()
        .train_config(settings=Settings(), model_path=Path("/m"), output_dir=Path("/o"), base_model_name="b")
        .early_stopping_patience
        == 0
    )  # fmt: skip  off unless asked


@pytest.mark.parametrize(
    ("asked", "validation", "param"),
    [({"patience": 2}, False, "early_stopping"), ({"patience": 0}, True, "early_stopping.patience"),
     ({"patience": 2, "min_delta": -1}, True, "early_stopping.min_delta")],
)  # fmt: skip
def test_bad_early_stopping_names_the_field(asked: dict, validation: bool, param: str) -> None:
    with pytest.raises(JobFailure) as info:
        request(early_stopping=asked, has_validation_file=validation)
    assert info.value.param == param


def test_a_continued_job_keeps_its_start_model_in_the_lora_column() -> None:
    spec = request(lora={"rank": 8, "alpha": 16.0}, init_from="ft:base:p::abc")
    columns = spec.columns()
    assert columns["lora"] == {"rank": 8, "alpha": 16.0, "init_from": "ft:base:p::abc"}
    again = JobSpec.from_row(SimpleNamespace(**columns, seed=spec.seed))
    assert again == spec and again.init_from == "ft:base:p::abc" and again.lora.rank == 8


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
    row = SimpleNamespace(method={"type": "reinforcement"}, hyperparameters={}, lora={}, seed=0)
    with pytest.raises(JobFailure) as info:
        JobSpec.from_row(row)
    assert (info.value.code, info.value.param) == ("unsupported_method", "method.type")
