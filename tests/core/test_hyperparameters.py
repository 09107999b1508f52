from __future__ import annotations

import pytest

from core.hyperparameters import AUTO_DPO_LR_MULTIPLIER, auto_batch_size, auto_epochs, resolve


@pytest.mark.parametrize(
    ("n", "epochs"),
    [(1, 25), (3, 25), (10, 10), (20, 5), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (30000, 1)],
)
def test_auto_epochs_follow_the_cookbook_rule(n: int, epochs: int) -> None:
    assert auto_epochs(n) == epochs


@pytest.mark.parametrize(
    ("n", "batch"), [(10, 1), (31, 1), (32, 2), (64, 4), (256, 16), (512, 32), (100000, 32)]
)
def test_auto_batch_size(n: int, batch: int) -> None:
    assert auto_batch_size(n) == batch


def test_resolve_keeps_numbers_and_fills_auto() -> None:
    hp = resolve(n_epochs=2, batch_size="auto", learning_rate_multiplier=0.5, n_examples=64)
    assert hp.as_dict() == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert resolve(n_examples=10).as_dict() == {
        "n_epochs": 10,
        "batch_size": 1,
        "learning_rate_multiplier": 1.0,
    }
    assert resolve(batch_size=64, n_examples=10).batch_size == 10  # never larger than the file


def test_resolve_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="`n_epochs`"):
        resolve(n_epochs=0, n_examples=10)
    with pytest.raises(ValueError, match="`batch_size`"):
        resolve(batch_size=1.5, n_examples=10)


def test_dpo_beta_resolves_and_is_written_only_for_dpo() -> None:
    from dataclasses import replace

    from core.hyperparameters import resolve_beta

    assert resolve_beta("auto") == resolve_beta(None) == 0.1 and resolve_beta(0.5) == 0.5
    for bad in (0, -1, "x", True):
        with pytest.raises(ValueError, match="`beta`"):
            resolve_beta(bad)
    hp = resolve(n_examples=10)
    assert "beta" not in hp.as_dict() and replace(hp, beta=0.1).as_dict()["beta"] == 0.1


def test_a_dpo_job_resolves_auto_learning_rate_to_a_tenth() -> None:
    assert resolve(n_examples=64, method="dpo").learning_rate_multiplier == AUTO_DPO_LR_MULTIPLIER == 0.1
    assert resolve(n_examples=64).learning_rate_multiplier == 1.0
    assert resolve(n_examples=64, method="dpo", learning_rate_multiplier=0.5).learning_rate_multiplier == 0.5
