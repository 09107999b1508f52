"""Drift detection on real text distributions generated here: news-style prompts vs code, German, long prompts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from core import drift_profile
from core.storage import ArtifactStore
from service import drift_monitor

SUBJECTS = ["Stocks", "The government", "Scientists", "The local team", "A court", "The city council",
            "Researchers", "Police", "Farmers", "The central bank", "Teachers", "Airlines"]  # fmt: skip
VERBS = ["announce", "reject", "celebrate", "warn about", "investigate", "approve", "delay", "report on",
         "protest against", "debate"]  # fmt: skip
OBJECTS = ["a new budget plan", "climate measures", "record profits", "the election results", "a vaccine trial",
           "the housing crisis", "a trade deal", "flood damage", "rising fuel prices", "school reforms"]  # fmt: skip
PLACES = ["Paris", "Ohio", "Kenya", "Tokyo", "Berlin", "Lima", "Toronto", "Mumbai", "Oslo", "Cairo"]
ASKS = [
    "Summarize this headline",
    "Classify the topic of",
    "Write a one-line summary of",
    "What is the tone of",
]

DE_SUBJECTS = ["Die Regierung", "Forscher", "Die Polizei", "Der Stadtrat", "Landwirte", "Die Zentralbank"]
DE_VERBS = ["kündigt", "lehnt", "untersucht", "genehmigt", "verschiebt", "kritisiert"]
DE_OBJECTS = ["einen neuen Haushaltsplan", "die Wahlergebnisse", "höhere Spritpreise", "die Schulreform",
              "ein Handelsabkommen", "die Wohnungskrise"]  # fmt: skip
DE_ASKS = ["Fasse diese Schlagzeile zusammen", "Welches Thema hat", "Wie ist der Ton von"]

REPO = Path(__file__).resolve().parents[2]

FUNCS = ["parse", "load", "merge", "filter", "compute", "render", "fetch", "update"]
TYPES = ["items", "rows", "config", "tokens", "users", "events"]


def headline(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} in {rng.choice(PLACES)}"


def news_prompt(rng: random.Random) -> str:
    """One to three headlines behind an instruction: prompts of about 60 to 250 characters."""
    heads = "; ".join(headline(rng) for _ in range(rng.randint(1, 3)))
    return f"{rng.choice(ASKS)}: {heads}."


def german_prompt(rng: random.Random) -> str:
    heads = "; ".join(
        f"{rng.choice(DE_SUBJECTS)} {rng.choice(DE_VERBS)} {rng.choice(DE_OBJECTS)} in {rng.choice(PLACES)} an"
        for _ in range(rng.randint(1, 3))
    )
    return f"{rng.choice(DE_ASKS)}: {heads}."


def code_prompt(rng: random.Random) -> str:
    name, kind, n = rng.choice(FUNCS), rng.choice(TYPES), rng.randint(1, 99)
    return (
        f"Fix the bug:\ndef {name}_{kind}({kind}: list[dict]) -> dict:\n"
        f"    out = {{}}\n    for i, x in enumerate({kind}):\n        if x.get('id') > {n}:\n"
        f"            out[x['id']] = {name}(x)\n    return out\n"
    )


def long_prompt(rng: random.Random) -> str:
    """Same vocabulary as the training prompts, but 25 to 40 headlines long (over 1,500 characters)."""
    return rng.choice(ASKS) + ": " + "; ".join(headline(rng) for _ in range(rng.randint(25, 40))) + "."


@pytest.fixture(scope="module")
def profile() -> dict:
    rng = random.Random(1)
    return drift_profile.build_profile([news_prompt(rng) for _ in range(600)])


def measure(profile: dict, prompts: list[str], *, model: str = "ft:test:p:x:1") -> tuple[float, float]:
    """Score and out-of-distribution ratio of a full window of `prompts` (a fresh monitor)."""
    monitor = drift_monitor.DriftMonitor(window=len(prompts), every=len(prompts))
    for prompt in prompts:
        monitor.observe(model, prompt, lambda: profile)
    score = REGISTRY.get_sample_value("ft_drift_score", {"model": model})
    ratio = REGISTRY.get_sample_value("ft_drift_out_of_distribution_ratio", {"model": model})
    monitor.forget(model)
    assert score is not None and ratio is not None
    return score, ratio


def sample(make, seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def test_profile_is_json_and_bounded(profile: dict) -> None:
    text = json.dumps(profile)
    assert len(text) < 40_000
    again = json.loads(text)
    assert again["version"] == drift_profile.PROFILE_VERSION and again["prompts"] == 600
    assert len(again["ngrams"]) == drift_profile.NGRAM_BUCKETS
    assert sum(again["ngrams"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(again["lengths"]) == pytest.approx(1.0, abs=1e-6)
    assert again["scripts"]["latin"] > 0.7 and again["scripts"]["cyrillic"] == 0
    assert 40 < again["ranges"]["length_min"] < again["ranges"]["length_max"] < 300
    assert 0.4 <= again["ranges"]["novelty_max"] <= 0.9


def test_empty_training_set_is_refused() -> None:
    with pytest.raises(ValueError, match="`prompts` is empty"):
        drift_profile.build_profile([])


def test_profile_is_the_same_in_another_process(profile: dict) -> None:
    """The worker builds the profile and the API reads it: hashing must not depend on PYTHONHASHSEED."""
    code = (
        "import json, random, sys; sys.path.insert(0, 'tests/service'); from test_drift_monitor import news_prompt;"
        "from core.drift_profile import build_profile; rng = random.Random(1);"
        "print(json.dumps(build_profile([news_prompt(rng) for _ in range(600)])))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == profile


def test_in_distribution_scores_low_and_shifts_score_high(profile: dict) -> None:
    same, same_ood = measure(profile, sample(news_prompt, seed=2))
    shifted = {
        "code": measure(profile, sample(code_prompt, seed=3)),
        "german": measure(profile, sample(german_prompt, seed=4)),
        "long": measure(profile, sample(long_prompt, seed=5)),
    }
    print(f"\ndrift in-distribution score={same:.4f} ood={same_ood:.3f}")
    for name, (score, ratio) in shifted.items():
        print(f"drift {name}: score={score:.4f} ood={ratio:.3f}")
    assert same < 0.03 and same_ood < 0.05
    for name, (score, ratio) in shifted.items():
        assert score > 5 * same and score > 0.1, name
        assert ratio > 0.9, name


def test_a_ten_example_training_set_still_separates() -> None:
    rng = random.Random(10)
    small = drift_profile.build_profile([news_prompt(rng) for _ in range(10)])
    same, same_ood = measure(small, sample(news_prompt, seed=11, n=50))
    code, code_ood = measure(small, sample(code_prompt, seed=12, n=50))
    print(
        f"\ndrift, 10 training prompts, window 50: in-distribution {same:.4f}/{same_ood:.2f}, code {code:.4f}/{code_ood:.2f}"
    )
    assert same < 0.15 and same_ood < 0.1
    assert code > 4 * same and code_ood > 0.9


def test_score_grows_with_the_share_of_shifted_traffic(profile: dict) -> None:
    rng = random.Random(6)
    scores = []
    for share in (0.0, 0.25, 0.5, 1.0):
        prompts = [code_prompt(rng) if rng.random() < share else news_prompt(rng) for _ in range(200)]
        scores.append(measure(profile, prompts)[0])
    print("\ndrift score by share of code prompts 0/25/50/100%:", [round(s, 4) for s in scores])
    assert scores == sorted(scores) and scores[-1] - scores[0] > 0.2


def test_window_is_bounded_and_recovers(profile: dict) -> None:
    model = "ft:test:p:window:1"
    monitor = drift_monitor.DriftMonitor(window=50, every=5)
    rng = random.Random(7)
    for _ in range(120):
        monitor.observe(model, code_prompt(rng), lambda: profile)
    assert REGISTRY.get_sample_value("ft_drift_window_prompts", {"model": model}) == 50
    assert REGISTRY.get_sample_value("ft_drift_out_of_distribution_ratio", {"model": model}) == 1.0
    high = REGISTRY.get_sample_value("ft_drift_score", {"model": model})
    for _ in range(60):  # more than a window of normal traffic pushes the code prompts out
        monitor.observe(model, news_prompt(rng), lambda: profile)
    low = REGISTRY.get_sample_value("ft_drift_score", {"model": model})
    assert high is not None and low is not None and low < high / 4
    assert REGISTRY.get_sample_value("ft_drift_out_of_distribution_ratio", {"model": model}) < 0.1
    monitor.forget(model)


def test_gauges_are_recomputed_every_n_prompts(profile: dict) -> None:
    model = "ft:test:p:every:1"
    monitor = drift_monitor.DriftMonitor(window=100, every=10)
    rng = random.Random(8)
    sizes = []
    for _ in range(25):
        monitor.observe(model, news_prompt(rng), lambda: profile)
        sizes.append(REGISTRY.get_sample_value("ft_drift_window_prompts", {"model": model}))
    assert sizes == [1.0] * 9 + [10.0] * 10 + [20.0] * 6
    monitor.forget(model)


def test_missing_or_bad_profile_is_a_no_op_and_not_reloaded_each_time() -> None:
    calls = Counter[str]()

    def missing() -> dict | None:
        calls["missing"] += 1
        return None

    def broken() -> dict | None:
        calls["broken"] += 1
        return {"version": 1, "ngrams": [1.0]}

    def raising() -> dict | None:
        raise OSError("disk gone")

    monitor = drift_monitor.DriftMonitor(retry_missing_seconds=60)
    for _ in range(5):
        monitor.observe("ft:test:p:missing:1", "hello", missing)
        monitor.observe("ft:test:p:broken:1", "hello", broken)
        monitor.observe("ft:test:p:raising:1", "hello", raising)
    assert calls == {"missing": 1, "broken": 1}
    assert monitor.models() == []
    text = generate_latest().decode()
    assert "missing:1" not in text and "broken:1" not in text and "raising:1" not in text


def test_a_non_text_prompt_does_not_raise(profile: dict) -> None:
    monitor = drift_monitor.DriftMonitor()
    monitor.observe("ft:test:p:odd:1", None, lambda: profile)  # type: ignore[arg-type]
    monitor.observe("ft:test:p:odd:1", "", lambda: profile)
    assert REGISTRY.get_sample_value("ft_drift_window_prompts", {"model": "ft:test:p:odd:1"}) == 1
    monitor.forget("ft:test:p:odd:1")


def test_forget_drops_the_series(profile: dict) -> None:
    model = "ft:test:p:gone:1"
    monitor = drift_monitor.DriftMonitor()
    monitor.observe(model, "Summarize this headline: Police report on flood damage in Oslo.", lambda: profile)
    assert f'ft_drift_score{{model="{model}"}}' in generate_latest().decode()
    monitor.forget(model)
    text = generate_latest().decode()
    assert model not in text
    assert monitor.models() == []


def test_least_recent_model_is_evicted_past_max_models(profile: dict) -> None:
    monitor = drift_monitor.DriftMonitor(max_models=2)
    for name in ("ft:test:p:m1:1", "ft:test:p:m2:1", "ft:test:p:m1:1", "ft:test:p:m3:1"):
        monitor.observe(name, "Classify the topic of: Stocks debate school reforms in Lima.", lambda: profile)
    assert monitor.models() == ["ft:test:p:m1:1", "ft:test:p:m3:1"]
    assert "m2:1" not in generate_latest().decode()
    for name in monitor.models():
        monitor.forget(name)


@pytest.mark.timeout(60)
def test_concurrent_observers_keep_the_window_consistent(profile: dict) -> None:
    monitor = drift_monitor.DriftMonitor(window=64, every=3)
    models = [f"ft:test:p:thread{i}:1" for i in range(3)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(300):
                make = code_prompt if i % 2 else news_prompt
                monitor.observe(models[i % 3], make(rng), lambda: profile)
                if seed == 0 and i % 50 == 0:
                    monitor.forget(models[2])
        except BaseException as exc:  # observe must never raise; record it if it does
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for model in models[:2]:
        window = monitor._windows[model]
        assert len(window.prompts) == 64
        expected = Counter[int]()
        for feat, _ in window.prompts:
            expected.update(feat.ngrams)
        assert window.ngrams == expected  # the running sums match the window exactly
        assert window.ood == sum(ood for _, ood in window.prompts)
    for model in models:
        monitor.forget(model)


def test_module_observe_reads_the_profile_from_the_store(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    rng = random.Random(9)
    drift_profile.save_profile(store, "ftjob-abc123", [news_prompt(rng) for _ in range(100)])
    assert store.exists("jobs/ftjob-abc123/drift_profile.json")
    model = "ft:test:p:store:abc123"
    drift_monitor.observe(store, model, "ftjob-abc123", code_prompt(rng))
    drift_monitor.observe(store, "ft:test:p:noprofile:1", "ftjob-none", code_prompt(rng))
    text = generate_latest().decode()
    assert f'ft_drift_score{{model="{model}"}}' in text
    assert f'ft_drift_out_of_distribution_ratio{{model="{model}"}} 1.0' in text
    assert f'ft_drift_window_prompts{{model="{model}"}} 1.0' in text
    assert "noprofile" not in text
    drift_monitor.forget(model)
    assert model not in generate_latest().decode()


def test_prompt_of_messages_joins_user_text() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}],
        },
        "not a message",
    ]
    assert drift_profile.prompt_of_messages(messages) == "first\nsecond"


def test_js_divergence_bounds() -> None:
    assert drift_profile.js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert drift_profile.js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert 0 < drift_profile.js_divergence([0.9, 0.1], [0.1, 0.9]) < 1
