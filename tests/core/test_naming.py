"""`core.naming`: the name checks take the whole string (a trailing newline is not a name), and model names."""

from __future__ import annotations

import pytest

from core.naming import adapter_name, checkpoint_model_name, fine_tuned_model_name, is_project_name, is_suffix


@pytest.mark.parametrize("check", [is_suffix, is_project_name])
@pytest.mark.parametrize("value", ["abc", "A-b_9", "x" * 64])
def test_names_of_allowed_characters_pass(check, value: str) -> None:  # type: ignore[no-untyped-def]
    assert check(value)


@pytest.mark.parametrize("check", [is_suffix, is_project_name])
@pytest.mark.parametrize("value", ["abc\n", "\nabc", "ab c", "a:b", "", "x" * 65, "a\x00", "é"])
def test_anything_else_fails_including_a_trailing_newline(check, value: str) -> None:  # type: ignore[no-untyped-def]
    assert not check(value)


def test_model_and_adapter_names() -> None:
    name = fine_tuned_model_name(base_model="org/m", project="p", suffix=None, job_id="ftjob-abc")
    assert name == "ft:org/m:p::abc"
    assert checkpoint_model_name(name, 7) == "ft:org/m:p::abc:ckpt-step-7"
    assert (
        adapter_name("ftjob-abc", 7) == "ftjob-abc-ckpt-step-7" and adapter_name("ftjob-abc") == "ftjob-abc"
    )
