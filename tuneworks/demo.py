"""`make demo`: start the whole stack, fine-tune SmolLM2 for real, and query the result with the openai SDK.

The task: route support tickets to a team and answer in a fixed JSON shape, `{"team": ..., "priority": ...}`.
The base model does not know the shape or the teams; after a short LoRA fine-tune on 48 generated tickets the
fine-tuned model answers held-out tickets in that shape. Everything goes through the public API, as a user's
code would: upload, create job, follow events, list checkpoints, chat with `ft:...`.

Then SFT is followed by DPO, the common recipe: a DPO job continues from the fine-tuned model (`model:
ft:...`) on preference pairs that prefer each ticket's right answer over the same answer routed to a wrong team,
and the held-out tickets are asked again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.settings import SMOLLM2, Settings

TEAMS = {
    "billing": [
        "I was charged twice for my {thing} subscription",
        "my {thing} invoice shows the wrong amount",
        "please refund the {thing} payment from last week",
        "the card payment for our {thing} plan failed",
    ],
    "outage": [
        "the {thing} service is down for everyone in our office",
        "we get error 503 from the {thing} server since this morning",
        "the {thing} app has been unreachable for an hour",
        "the {thing} dashboard does not load at all",
    ],
    "account": [
        "I cannot log in to the {thing} portal after the password reset",
        "how do I add a new user to our {thing} workspace",
        "please delete my {thing} account",
        "two-factor codes for {thing} never arrive",
    ],
}
THINGS = ["analytics", "mail", "storage", "CRM", "VPN", "chat", "backup", "wiki"]
URGENT = ["asap", "urgent!", "this blocks our release", "customers are complaining"]
SYSTEM = "You route support tickets. Answer with JSON only."
# 48 examples x 4 epochs at batch 4 = 48 steps at lr 1e-3: the team routing is learned reliably.
METHOD = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 1}},
}


# SFT then DPO: 48 pairs x 2 epochs at batch 4 = 24 steps; the reference is the SFT model.
DPO_METHOD = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "beta": 0.1}}}


def tickets(n: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """`n` tickets with their routing answer, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        team = list(TEAMS)[i % len(TEAMS)]
        text = rng.choice(TEAMS[team]).format(thing=rng.choice(THINGS))
        urgent = rng.random() < 0.4
        if urgent:
            text = f"{text}, {rng.choice(URGENT)}"
        out.append((text, {"team": team, "priority": "high" if urgent else "normal"}))
    return out


def training_jsonl(rows: list[tuple[str, dict[str, str]]]) -> bytes:
    lines = []
    for text, answer in rows:
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(answer)},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


def preference_jsonl(rows: list[tuple[str, dict[str, str]]], seed: int) -> bytes:
    """Pairs that prefer each ticket's answer over the same answer routed to another team."""
    rng = random.Random(seed)
    lines = []
    for text, answer in rows:
        wrong = {
            "team": rng.choice([t for t in TEAMS if t != answer["team"]]),
            "priority": answer["priority"],
        }
        pair = {
            "input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]},
            "preferred_output": [{"role": "assistant", "content": json.dumps(answer)}],
            "non_preferred_output": [{"role": "assistant", "content": json.dumps(wrong)}],
        }
        lines.append(json.dumps(pair))
    return ("\n".join(lines) + "\n").encode()


def _free_port(preferred: int) -> int:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"demo: {what} not ready after {timeout:.0f} s (see the logs in FT_HOME/logs)")


def main() -> int:
    import openai

    settings = Settings()
    port = _free_port(settings.api_port)
    env = {**os.environ, "FT_HOME": str(settings.home_dir), "FT_API_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    base = f"http://127.0.0.1:{port}"
    print(f"== Starting the stack (FT_HOME={settings.home_dir}) ==", flush=True)
    up = subprocess.Popen([sys.executable, "-m", "tuneworks.cli", "up"], env=env, start_new_session=True)
    try:
        _wait("API", lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 120)
        key = subprocess.run(
            [sys.executable, "-m", "tuneworks.cli", "keys", "create", "--project", "demo"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
        return _run(client, base, key)
    finally:
        print("== Stopping the stack ==", flush=True)
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


def _run(client, base: str, key: str) -> int:  # type: ignore[no-untyped-def]
    train, held_out = tickets(48, seed=1), tickets(12, seed=99)
    upload = client.files.create(file=("tickets.jsonl", training_jsonl(train)), purpose="fine-tune")
    print(f"uploaded {upload.id}: {upload.bytes} bytes, status {upload.status}")
    valid = client.files.create(file=("held-out.jsonl", training_jsonl(held_out)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=SMOLLM2,
        training_file=upload.id,
        validation_file=valid.id,
        suffix="tickets",
        seed=7,
        method=METHOD,
    )
    print(f"created {job.id} ({job.status})")
    job = _follow(client, job.id)
    if job.status != "succeeded":
        print(f"job ended {job.status}: {job.error}")
        return 1
    print(f"fine-tuned model: {job.fine_tuned_model}; trained tokens {job.trained_tokens}")
    print(f"evaluation on the validation file: {json.dumps((job.model_extra or {}).get('evaluation'))}")
    for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id):
        print(f"  checkpoint step {ckpt.step_number}: {ckpt.fine_tuned_model_checkpoint}")
    _wait("inference", lambda: _answer(client, job.fine_tuned_model, held_out[0][0]) is not None, 600)
    return _compare(client, job.fine_tuned_model, held_out) or _dpo(
        client, job.fine_tuned_model, train, held_out
    )


def _dpo(client, sft_model: str, train: list, held_out: list) -> int:  # type: ignore[no-untyped-def]
    """The second stage: DPO from the SFT model on preference pairs, then the held-out tickets again."""
    print("\n== SFT then DPO: a DPO job continues from the fine-tuned model ==", flush=True)
    pairs = client.files.create(
        file=("preferences.jsonl", preference_jsonl(train, seed=5)), purpose="fine-tune"
    )
    valid = client.files.create(
        file=("held-out-pairs.jsonl", preference_jsonl(held_out, seed=6)), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(model=sft_model, training_file=pairs.id, validation_file=valid.id,
                                         suffix="tickets-dpo", seed=7, method=DPO_METHOD)  # fmt: skip
    print(f"created {job.id} from {job.model} ({job.status})")
    job = _follow(client, job.id)
    if job.status != "succeeded":
        print(f"DPO job ended {job.status}: {job.error}")
        return 1
    print(
        f"DPO model: {job.fine_tuned_model}; evaluation {json.dumps((job.model_extra or {}).get('evaluation'))}"
    )
    _wait("inference", lambda: _answer(client, job.fine_tuned_model, held_out[0][0]) is not None, 600)
    _compare(client, job.fine_tuned_model, held_out, baseline=sft_model, labels=("SFT", "SFT+DPO"))
    return 0


def _follow(client, job_id: str):  # type: ignore[no-untyped-def]
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = list(client.fine_tuning.jobs.list_events(job_id, limit=50))
        for event in reversed(events):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  [{event.level}] {event.message}")
        if job.status in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(2)


def _answer(client, model: str, text: str) -> str | None:  # type: ignore[no-untyped-def]
    try:
        reply = client.chat.completions.create(
            model=model,
            temperature=0,
            max_completion_tokens=40,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        )
    except Exception:  # the inference server may still be starting
        return None
    return reply.choices[0].message.content or ""


def _compare(  # type: ignore[no-untyped-def]
    client, model: str, held_out: list[tuple[str, dict[str, str]]], *, baseline: str = SMOLLM2,
    labels: tuple[str, str] = ("base", "fine-tuned"),
) -> int:  # fmt: skip
    exact = {baseline: 0, model: 0}
    routed = {baseline: 0, model: 0}
    for text, expected in held_out:
        print(f"\nticket: {text}\n  expected: {json.dumps(expected)}")
        for name in (baseline, model):
            got = _answer(client, name, text) or ""
            answer = _json_or_none(got)
            exact[name] += answer == expected
            routed[name] += isinstance(answer, dict) and answer.get("team") == expected["team"]
            label = labels[0] if name == baseline else labels[1]
            print(f"  {label:>10}: {got.strip()[:80]!r} {'OK' if answer == expected else ''}")
    n, (before, after) = len(held_out), labels
    print(f"\nheld-out tickets: {n}")
    print(f"  right team:   {before} {routed[baseline]}/{n}, {after} {routed[model]}/{n}")
    print(f"  exact answer: {before} {exact[baseline]}/{n}, {after} {exact[model]}/{n}")
    return 0 if routed[model] > routed[baseline] else 1


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
