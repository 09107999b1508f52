"""The job spec: the one place where a job's method, hyperparameters, LoRA and early-stopping settings, and the
model it continues from, are interpreted.

The API builds it from a create request (`JobSpec.from_request`) and stores `columns()` on the job row; the
worker reads it back (`JobSpec.from_row`) and turns it into the trainer's input (`train_config`). The deprecated
top-level `hyperparameters` are mirrored into `method.<type>.hyperparameters`, and once the worker has resolved
"auto" from the data, `resolved_columns()` writes the numbers back in both places, as OpenAI does.

Extensions are stored in existing JSON columns: `early_stopping` inside the `hyperparameters` column (the wire
shape lists only OpenAI's keys from it), and the fine-tuned model a continued job starts from as
`lora.init_from` (its adapter's rank, alpha and targets are the job's `lora`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.failures import JobFailure
from core.hyperparameters import Hyperparameters, resolve_beta
from core.settings import Settings
from core.train_config import TrainConfig

SUPPORTED_METHODS = frozenset({"supervised", "dpo"})
HYPERPARAMETER_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHOD_KEYS = {"supervised": HYPERPARAMETER_KEYS, "dpo": (*HYPERPARAMETER_KEYS, "beta")}
EARLY_STOPPING = "early_stopping"  # key of the extension inside the `hyperparameters` column
INIT_FROM = "init_from"  # key of the continued-from model inside the `lora` column
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05  # defaults when a job leaves `lora` keys out


@dataclass(frozen=True)
class LoraSpec:
    """The `lora` extension of a job, with the defaults filled in."""

    rank: int = LORA_RANK
    alpha: float = LORA_ALPHA
    dropout: float = LORA_DROPOUT
    target_modules: tuple[str, ...] | None = None  # None: every attention and MLP projection
    qlora: bool = False

    @classmethod
    def of(cls, asked: dict[str, Any] | None) -> LoraSpec:
        asked = asked or {}
        modules = asked.get("target_modules")
        return cls(
            rank=int(asked.get("rank") or LORA_RANK),
            alpha=float(asked.get("alpha") or LORA_ALPHA),
            dropout=float(asked["dropout"]) if asked.get("dropout") is not None else LORA_DROPOUT,
            target_modules=tuple(modules) if modules else None,
            qlora=bool(asked.get("qlora") or False),
        )


@dataclass(frozen=True)
class EarlyStopping:
    """The `early_stopping` extension: stop when the validation loss has not improved by more than
    `min_delta` for `patience` evaluations in a row; the best weights become the fine-tuned model."""

    patience: int
    min_delta: float = 0.0

    @classmethod
    def of(cls, asked: dict[str, Any]) -> EarlyStopping:
        """The settings of an `early_stopping` object.

        Raises:
            JobFailure: `patience` is not a whole number >= 1, or `min_delta` is negative.
        """
        patience, min_delta = asked.get("patience"), asked.get("min_delta", 0.0) or 0.0
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise JobFailure("invalid_request", "`early_stopping.patience` must be a whole number >= 1.",
                             "early_stopping.patience")  # fmt: skip
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or min_delta < 0:
            raise JobFailure("invalid_request", "`early_stopping.min_delta` must be a number >= 0.",
                             "early_stopping.min_delta")  # fmt: skip
        return cls(patience, float(min_delta))

    def as_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "min_delta": self.min_delta}


@dataclass(frozen=True)
class JobSpec:
    """What to train: the method, the hyperparameters as asked ("auto" or numbers), LoRA settings, the seed,
    early stopping (None: off) and the fine-tuned model a continued job starts from (None: a fresh adapter)."""

    method: str = "supervised"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    lora_asked: dict[str, Any] = field(default_factory=dict)  # stored as the user gave it
    seed: int = 0
    early_stopping: EarlyStopping | None = None
    init_from: str | None = None

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec.of(self.lora_asked)

    @classmethod
    def from_request(
        cls,
        *,
        method: dict[str, Any] | None,
        hyperparameters: dict[str, Any] | None,
        lora: dict[str, Any] | None,
        seed: int,
        max_lora_rank: int,
        early_stopping: dict[str, Any] | None = None,
        has_validation_file: bool = False,
        init_from: str | None = None,
    ) -> JobSpec:
        """The spec of a create request (its `method`, deprecated `hyperparameters`, `lora` and
        `early_stopping`, as dicts; `init_from`: the fine-tuned model a continued job starts from).

        Raises:
            JobFailure: an unsupported `method.type`, `hyperparameters` that disagree with `method`, a LoRA
                rank the inference servers cannot load, early stopping without a validation file or with bad
                values, a `beta` that is not positive; `param` names the field.
        """
        kind = (method or {}).get("type") or "supervised"
        _check_method(kind)
        given = ((method or {}).get(kind) or {}).get("hyperparameters")
        if hyperparameters is not None and given is not None and hyperparameters != given:
            raise JobFailure(
                "invalid_request",
                f"`hyperparameters` (deprecated) and `method.{kind}.hyperparameters` disagree; give only one.",
                "hyperparameters",
            )
        chosen = {key: "auto" for key in METHOD_KEYS[kind]} | (given or hyperparameters or {})
        _check_beta(kind, chosen)
        stopping = _early_stopping(early_stopping, has_validation_file)
        spec = cls(method=kind, hyperparameters=chosen, lora_asked=dict(lora or {}), seed=seed,
                   early_stopping=stopping, init_from=init_from)  # fmt: skip
        if spec.lora.rank > max_lora_rank:
            raise JobFailure(
                "invalid_request",
                f"`lora.rank` {spec.lora.rank} is above {max_lora_rank}, the largest rank the inference servers "
                "load (FT_VLLM_MAX_LORA_RANK).",
                "lora.rank",
            )
        return spec

    @classmethod
    def from_row(cls, row: Any) -> JobSpec:
        """The spec stored on a job row (`method`, `hyperparameters`, `lora`, `seed` columns).

        Raises:
            JobFailure: `unsupported_method` for a method this worker cannot train.
        """
        method = row.method or {}
        kind = method.get("type", "supervised")
        if kind not in SUPPORTED_METHODS:
            raise JobFailure(
                "unsupported_method",
                f"Method {kind!r} is not supported; use supervised or dpo",
                "method.type",
            )
        nested = (method.get(kind) or {}).get("hyperparameters") or {}
        values = {**(row.hyperparameters or {}), **nested}
        stopping = values.pop(EARLY_STOPPING, None)
        lora = dict(row.lora or {})
        return cls(
            method=kind,
            hyperparameters=values,
            lora_asked=lora,
            seed=int(row.seed or 0),
            early_stopping=EarlyStopping.of(stopping) if stopping else None,
            init_from=lora.pop(INIT_FROM, None),
        )

    def columns(self) -> dict[str, Any]:
        """The job row's `method`, `hyperparameters` and `lora` columns for this spec."""
        lora = dict(self.lora_asked) | ({INIT_FROM: self.init_from} if self.init_from else {})
        return self._with(dict(self.hyperparameters)) | {"lora": lora}

    def resolved_columns(self, resolved: Hyperparameters) -> dict[str, Any]:
        """The `method` and `hyperparameters` columns once "auto" was resolved to `resolved`."""
        return self._with(resolved.as_dict())

    def _with(self, values: dict[str, Any]) -> dict[str, Any]:
        method = {"type": self.method, self.method: {"hyperparameters": dict(values)}}
        stopping = {EARLY_STOPPING: self.early_stopping.as_dict()} if self.early_stopping else {}
        return {"method": method, "hyperparameters": values | stopping}

    def train_config(
        self, *, settings: Settings, model_path: Path, output_dir: Path, base_model_name: str,
        init_adapter: Path | None = None,
    ) -> TrainConfig:  # fmt: skip
        """The trainer's input for this spec, on this worker's device and threads (`init_adapter`: the local
        folder of the adapter a continued job starts from)."""
        lora, stopping = self.lora, self.early_stopping
        return TrainConfig(
            model_path=model_path,
            output_dir=output_dir,
            base_model_name=base_model_name,
            n_epochs=self.hyperparameters.get("n_epochs", "auto"),
            batch_size=self.hyperparameters.get("batch_size", "auto"),
            learning_rate_multiplier=self.hyperparameters.get("learning_rate_multiplier", "auto"),
            method=self.method,
            beta=self.hyperparameters.get("beta", "auto"),
            init_adapter=init_adapter,
            early_stopping_patience=stopping.patience if stopping else 0,
            early_stopping_min_delta=stopping.min_delta if stopping else 0.0,
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
            qlora=lora.qlora,
            seed=self.seed,
            device=settings.train_device,
            threads=settings.train_threads,
            resume_state_seconds=settings.resume_state_seconds,
        )


def _check_beta(kind: str, values: dict[str, Any]) -> None:
    if kind != "dpo":
        return
    try:
        resolve_beta(values.get("beta"))
    except ValueError as exc:
        raise JobFailure("invalid_request", str(exc), "method.dpo.hyperparameters.beta") from exc


def _early_stopping(asked: dict[str, Any] | None, has_validation_file: bool) -> EarlyStopping | None:
    if asked is None:
        return None
    stopping = EarlyStopping.of(asked)
    if not has_validation_file:
        raise JobFailure("invalid_request", "`early_stopping` needs a `validation_file`: it stops on the "
                         "validation loss.", "early_stopping")  # fmt: skip
    return stopping


def _check_method(kind: str) -> None:
    if kind == "reinforcement":
        raise JobFailure(
            "invalid_request", "Reinforcement fine-tuning is not supported by this service.", "method.type"
        )
    if kind not in SUPPORTED_METHODS:
        raise JobFailure(
            "invalid_request",
            f"method.type {kind!r} is not supported: this service trains LoRA adapters with "
            "`method.type` supervised or dpo.",
            "method.type",
        )
