"""The job spec: the one place where a job's method, hyperparameters and LoRA settings are interpreted.

The API builds it from a create request (`JobSpec.from_request`) and stores `columns()` on the job row; the
worker reads it back (`JobSpec.from_row`) and turns it into the trainer's input (`train_config`). The deprecated
top-level `hyperparameters` are mirrored into `method.<type>.hyperparameters`, and once the worker has resolved
"auto" from the data, `resolved_columns()` writes the numbers back in both places, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.failures import JobFailure
from core.hyperparameters import Hyperparameters
from core.settings import Settings
from core.train_config import TrainConfig

SUPPORTED_METHODS = frozenset(
    {"supervised"}
)  # the trainer is supervised only (DPO requests are checked, refused)
HYPERPARAMETER_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
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
class JobSpec:
    """What to train: the method, the hyperparameters as asked ("auto" or numbers), LoRA settings, the seed."""

    method: str = "supervised"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    lora_asked: dict[str, Any] = field(default_factory=dict)  # stored as the user gave it
    seed: int = 0

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
    ) -> JobSpec:
        """The spec of a create request (its `method`, deprecated `hyperparameters` and `lora`, as dicts).

        Raises:
            JobFailure: an unsupported `method.type`, `hyperparameters` that disagree with `method`, or a LoRA
                rank the inference servers cannot load; `param` names the field.
        """
        kind = (method or {}).get("type") or "supervised"
        _check_method(kind)
        given = ((method or {}).get(kind) or {}).get("hyperparameters")
        if hyperparameters is not None and given is not None and hyperparameters != given:
            raise JobFailure(
                "invalid_request",
                "`hyperparameters` (deprecated) and `method.supervised.hyperparameters` disagree; give only one.",
                "hyperparameters",
            )
        chosen = {key: "auto" for key in HYPERPARAMETER_KEYS} | (given or hyperparameters or {})
        spec = cls(method=kind, hyperparameters=chosen, lora_asked=dict(lora or {}), seed=seed)
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
                "unsupported_method", f"Method {kind!r} is not supported yet; use supervised", "method.type"
            )
        nested = (method.get(kind) or {}).get("hyperparameters") or {}
        return cls(
            method=kind,
            hyperparameters={**(row.hyperparameters or {}), **nested},
            lora_asked=dict(row.lora or {}),
            seed=int(row.seed or 0),
        )

    def columns(self) -> dict[str, Any]:
        """The job row's `method`, `hyperparameters` and `lora` columns for this spec."""
        return self._with(dict(self.hyperparameters)) | {"lora": dict(self.lora_asked)}

    def resolved_columns(self, resolved: Hyperparameters) -> dict[str, Any]:
        """The `method` and `hyperparameters` columns once "auto" was resolved to `resolved`."""
        return self._with(resolved.as_dict())

    def _with(self, values: dict[str, Any]) -> dict[str, Any]:
        method = {"type": self.method, self.method: {"hyperparameters": dict(values)}}
        return {"method": method, "hyperparameters": values}

    def train_config(
        self, *, settings: Settings, model_path: Path, output_dir: Path, base_model_name: str
    ) -> TrainConfig:
        """The trainer's input for this spec, on this worker's device and threads."""
        lora = self.lora
        return TrainConfig(
            model_path=model_path,
            output_dir=output_dir,
            base_model_name=base_model_name,
            n_epochs=self.hyperparameters.get("n_epochs", "auto"),
            batch_size=self.hyperparameters.get("batch_size", "auto"),
            learning_rate_multiplier=self.hyperparameters.get("learning_rate_multiplier", "auto"),
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


def _check_method(kind: str) -> None:
    if kind == "reinforcement":
        raise JobFailure(
            "invalid_request", "Reinforcement fine-tuning is not supported by this service.", "method.type"
        )
    if kind not in SUPPORTED_METHODS:
        raise JobFailure(
            "invalid_request",
            f"method.type {kind!r} is not supported yet: this service trains supervised LoRA adapters "
            "(`method.type: supervised`).",
            "method.type",
        )
