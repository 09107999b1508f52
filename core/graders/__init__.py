"""Graders of OpenAI's fine-tuning API: `string_check`, `text_similarity`, `python`, `score_model`,
`label_model` (inside `multi` only) and `multi`, as pure functions of (grader, sample, item) -> reward in [0, 1].

`parse_grader` reads and bounds a definition, `check_runnable` refuses what this service cannot run as
configured, `grade` / `grade_batch` compute rewards. Used by the API's `/fine_tuning/alpha/graders/*` and by the
reinforcement runner.
"""

from __future__ import annotations

from core.graders.errors import GradeErrors, GraderError, TemplateError
from core.graders.grading import GradeContext, GradeResult, check_runnable, grade, grade_batch, judge_models
from core.graders.judge import Judge, JudgeReply, JudgeRequest, JudgeUnavailable
from core.graders.sandbox import SandboxLimits
from core.graders.spec import Grader, grader_json, parse_grader

__all__ = [
    "GradeContext",
    "GradeErrors",
    "GradeResult",
    "Grader",
    "GraderError",
    "Judge",
    "JudgeReply",
    "JudgeRequest",
    "JudgeUnavailable",
    "SandboxLimits",
    "TemplateError",
    "check_runnable",
    "grade",
    "grade_batch",
    "grader_json",
    "judge_models",
    "parse_grader",
]
