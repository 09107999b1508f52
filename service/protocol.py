"""Wire models of the OpenAI API, with OpenAI's names and field order. Our extensions sit in marked blocks.

Responses are built from table rows by the `to_openai()` functions of `files.py`, `jobs.py` and `models.py`.
Request models forbid unknown keys, so a typo is a 400 naming the key; values that may be `"auto"` are checked
by validators (not unions), so that a 400's `param` is the plain dotted path of the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from core.naming import is_suffix


class OpenAIBaseModel(BaseModel):
    """Base of every wire model: unknown keys rejected in requests."""

    model_config = ConfigDict(extra="forbid")


# --- errors ------------------------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# --- files -------------------------------------------------------------------------------------------------
USER_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class FileObject(OpenAIBaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(OpenAIBaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- fine-tuning jobs: requests ----------------------------------------------------------------------------
def _auto_or(kind: type, *, low: float, high: float | None, low_open: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f'must be "auto" or a {kind.__name__}')
        if kind is int and value != int(value):
            raise ValueError('must be "auto" or an integer')
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"must be {bound}, got {value}")
        return int(value) if kind is int else float(value)

    return check


NEpochs = Annotated[Any, AfterValidator(_auto_or(int, low=1, high=50))]
BatchSize = Annotated[Any, AfterValidator(_auto_or(int, low=1, high=256))]
LearningRate = Annotated[Any, AfterValidator(_auto_or(float, low=0, high=None, low_open=True))]
Beta = Annotated[Any, AfterValidator(_auto_or(float, low=0, high=2, low_open=True))]


class SupervisedHyperparameters(OpenAIBaseModel):
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: LearningRate = "auto"
    n_epochs: NEpochs = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Beta = "auto"


class SupervisedMethod(OpenAIBaseModel):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(OpenAIBaseModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(OpenAIBaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class WandbIntegration(OpenAIBaseModel):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(OpenAIBaseModel):
    type: Literal["wandb"]
    wandb: WandbIntegration


class LoraConfig(OpenAIBaseModel):
    """Extension: LoRA settings of a job (`"lora": {...}` in the create body). Unset keys take the trainer's
    defaults."""

    rank: int | None = Field(default=None, ge=1, le=256, description="LoRA rank r.")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (scaling = alpha / rank).")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        default=None, min_length=1, description="Module names to adapt, e.g. [`q_proj`, `v_proj`]."
    )
    qlora: bool | None = Field(default=None, description="4-bit base weights (QLoRA; CUDA workers only).")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "_." for c in name):
                raise ValueError(f"invalid module name {name!r}")
        return value


class EarlyStoppingConfig(OpenAIBaseModel):
    """Extension: `"early_stopping": {"patience": N, "min_delta": x}` in the create body (needs a validation
    file). Stops when the full validation loss has not improved by more than `min_delta` for `patience`
    evaluations; the best weights become the fine-tuned model."""

    patience: int = Field(ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="The smallest drop of the loss that counts.")


def _metadata(value: dict[str, Any] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError(f"at most 16 keys, got {len(value)}")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"key {key[:20]!r}… is longer than 64 characters")
        if not isinstance(item, str):
            raise ValueError(f"value of {key!r} must be a string")
        if len(item) > 512:
            raise ValueError(f"value of {key!r} is longer than 512 characters")
    return value


Metadata = Annotated[dict[str, Any] | None, AfterValidator(_metadata)]


class JobCreateRequest(OpenAIBaseModel):
    model: str
    training_file: str
    hyperparameters: SupervisedHyperparameters | None = None  # deprecated: mirrored into `method`
    suffix: str | None = None
    validation_file: str | None = None
    integrations: list[Integration] | None = Field(default=None, max_length=5)
    seed: int | None = Field(default=None, ge=0, le=2147483647)
    method: Method | None = None
    metadata: Metadata = None
    # --- Tuneworks extension ---
    lora: LoraConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not is_suffix(value):
            raise ValueError("must be 1 to 64 characters of A-Z a-z 0-9 _ - (no `:`)")
        return value


# --- fine-tuning jobs: responses ---------------------------------------------------------------------------
class JobError(OpenAIBaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(OpenAIBaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    # --- Tuneworks extensions ---
    evaluation: dict[str, Any] | None = None  # metrics on the validation data at the end of training
    lora: dict[str, Any] = Field(default_factory=dict)  # LoRA settings (as asked, then as trained)
    early_stopping: dict[str, Any] | None = None  # as asked; at the end also best_step, stopped_at_step


class FineTuningJobList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(OpenAIBaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None


class FineTuningJobEventList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(OpenAIBaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class FineTuningJobCheckpointList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- models ------------------------------------------------------------------------------------------------
class Model(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # --- vLLM-style extras (clients ignore them) ---
    parent: str | None = None  # the base model of a fine-tuned model


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ModelDeleted(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# --- checkpoint permissions (`openai.types.fine_tuning.checkpoints`) -----------------------------------------
class CheckpointPermission(OpenAIBaseModel):
    id: str
    created_at: int
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    project_id: str


class CheckpointPermissionCreateRequest(OpenAIBaseModel):
    project_ids: list[str]


class CheckpointPermissionList(OpenAIBaseModel):
    """The page of create (`SyncPage`) and of list (`SyncConversationCursorPage`)."""

    object: Literal["list"] = "list"
    data: list[CheckpointPermission]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class CheckpointPermissionDeleted(OpenAIBaseModel):
    id: str
    deleted: bool
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
