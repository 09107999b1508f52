"""How OpenAI's `"auto"` hyperparameters resolve to numbers from the training data.

- `n_epochs`: the cookbook rule (contract §3.2): target 3 epochs, but at least 100 and at most 25000 trained
  examples in total (examples x epochs), clamped to [1, 25].
- `batch_size`: 1 up to 31 examples, then the power of two nearest below n/16, capped at 32: every epoch has at
  least about 16 optimizer steps, and big files do not take tiny steps (32 -> 2, 64 -> 4, 256 -> 16, 512+ -> 32).
- `learning_rate_multiplier`: 1 (the base learning rate of `TrainConfig`).
- `beta` (DPO only): 0.1, the usual strength of the pull towards the reference policy.
- DPO's `learning_rate_multiplier`: 0.1 (`AUTO_DPO_LR_MULTIPLIER`), a tenth of supervised training's. At the
  supervised rate, 24 DPO steps on the demo's pairs pushed the chosen answers' log-probabilities down by tens of
  nats along with the rejected ones and the model stopped answering in JSON (`make demo`, 2026-12-02).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25000
MIN_EPOCHS, MAX_EPOCHS = 1, 25
MAX_AUTO_BATCH = 32
AUTO_BETA = 0.1
AUTO_DPO_LR_MULTIPLIER = 0.1  # "auto" learning_rate_multiplier of a DPO job (see the module docstring)


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved numbers, in OpenAI's names."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = None  # DPO jobs only

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        }
        if self.beta is not None:
            values["beta"] = self.beta
        return values


def auto_epochs(n_examples: int) -> int:
    """The cookbook's default number of epochs for `n_examples` training examples."""
    n = max(1, n_examples)
    epochs = TARGET_EPOCHS
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n)
    elif n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, epochs))


def auto_batch_size(n_examples: int) -> int:
    """The batch size used for `batch_size: "auto"` (see the module docstring)."""
    if n_examples < 32:
        return 1
    return min(MAX_AUTO_BATCH, 2 ** int(math.log2(n_examples / 16)))


def resolve(
    *, n_epochs: Any = AUTO, batch_size: Any = AUTO, learning_rate_multiplier: Any = AUTO, n_examples: int,
    method: str = "supervised",
) -> Hyperparameters:  # fmt: skip
    """Numbers for each hyperparameter; `"auto"` (or None) resolves by the rules above.

    Args:
        n_epochs: a positive int or "auto".
        batch_size: a positive int or "auto".
        learning_rate_multiplier: a positive number or "auto".
        n_examples: examples in the training file.
        method: `dpo` resolves an "auto" learning-rate multiplier to `AUTO_DPO_LR_MULTIPLIER`.

    Returns:
        The resolved hyperparameters.

    Raises:
        ValueError: a value is neither "auto" nor a positive number.
    """
    epochs = auto_epochs(n_examples) if _is_auto(n_epochs) else _positive(n_epochs, "n_epochs", int)
    batch = auto_batch_size(n_examples) if _is_auto(batch_size) else _positive(batch_size, "batch_size", int)
    batch = min(batch, max(1, n_examples))
    lr = (
        (AUTO_DPO_LR_MULTIPLIER if method == "dpo" else 1.0)
        if _is_auto(learning_rate_multiplier)
        else _positive(learning_rate_multiplier, "learning_rate_multiplier", float)
    )
    return Hyperparameters(int(epochs), int(batch), float(lr))


def resolve_beta(value: Any) -> float:
    """DPO's `beta`: "auto" (or None) is 0.1.

    Raises:
        ValueError: neither "auto" nor a positive number.
    """
    return AUTO_BETA if _is_auto(value) else float(_positive(value, "beta", float))


def _is_auto(value: Any) -> bool:
    return value is None or value == AUTO


def _positive(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f'`{name}` must be a positive number or "auto", got {value!r}')
    if kind is int and int(value) != value:
        raise ValueError(f"`{name}` must be a whole number, got {value!r}")
    return kind(value)
