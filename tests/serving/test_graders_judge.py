"""Model graders with a real judge: `score_model` and `label_model` (in a `multi`) through the real SDK's
`fine_tuning.alpha.graders.run`, judged by the session's vLLM (SmolLM2) through our own gateway."""

from __future__ import annotations

import openai
import pytest

from core.settings import SMOLLM2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCORE = {
    "type": "score_model",
    "name": "judge",
    "model": SMOLLM2,
    "input": [
        {"role": "system", "content": "Rate how well the answer matches the reference, from 0 to 10."},
        {"role": "user", "content": "Answer: {{ sample.output_text }}\nReference: {{ item.reference }}"},
    ],
    "range": [0, 10],
    "sampling_params": {"temperature": 0, "seed": 1, "max_completions_tokens": 48},
}
LABEL = {
    "type": "label_model", "name": "mood", "model": SMOLLM2,
    "input": [{"role": "user", "content": "Is this text positive or negative? {{ sample.output_text }}"}],
    "labels": ["positive", "negative"], "passing_labels": ["positive"],
}  # fmt: skip


def test_score_and_label_model_judged_through_the_gateway(gateway) -> None:  # type: ignore[no-untyped-def]
    graders = gateway.client().fine_tuning.alpha.graders
    scored = graders.run(grader=SCORE, model_sample="Paris", item={"reference": "Paris"})
    errors = scored.metadata.errors
    assert not (errors.api_model_grader_parse_error or errors.api_model_grader_server_error), errors
    assert 0.0 <= scored.reward <= 1.0 and 0 <= float(scored.metadata.scores["raw_score"]) <= 10  # type: ignore[arg-type]
    assert scored.metadata.token_usage and scored.metadata.token_usage > 0
    usage = scored.api_model_grader_token_usage_per_model[SMOLLM2]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0  # type: ignore[index]

    multi = {"type": "multi", "name": "m", "graders": {"mood": LABEL}, "calculate_output": "mood"}
    labelled = graders.run(grader=multi, model_sample="I love this, it is wonderful!", item={})
    assert not labelled.metadata.errors.api_model_grader_parse_error, labelled.metadata.errors
    assert labelled.reward in (0.0, 1.0) and labelled.sub_rewards == {"mood": labelled.reward}
    print(f"\n[figures] SmolLM2 judge: score {scored.metadata.scores}, label reward {labelled.reward}, "
          f"{scored.metadata.token_usage} tokens, {scored.metadata.execution_time:.2f} s")  # fmt: skip


def test_judge_model_of_nobody_is_a_400(gateway) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().fine_tuning.alpha.graders.run(
            grader={**SCORE, "model": "ft:nothing:here"}, model_sample="x", item={"reference": "y"}
        )
    assert raised.value.body["param"] == "grader.model"  # type: ignore[index]
