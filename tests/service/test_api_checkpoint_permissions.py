"""Checkpoint sharing (issue 12) with the real SDK's `client.fine_tuning.checkpoints.permissions` against a real
`tuneworks api`: grant, cursor-paginated list (`order`, `project_id`), delete; only the owner project sees them;
`granted()` (what job creation asks) follows the grants, and a granted project still cannot see the checkpoint."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from core.base_models import TINY
from core.ids import new_id
from core.naming import checkpoint_model_name, fine_tuned_model_name
from core.tables import ModelRow, Project
from service.checkpoint_permissions import granted
from tests.conftest import ApiServer


def add_checkpoint(db: Engine, *, project: str = "proj-test", suffix: str = "shared") -> tuple[str, str]:
    """A final model and its checkpoint at step 4 of `project`, as the worker registers them."""
    job_id = new_id("ftjob-")
    final = fine_tuned_model_name(base_model=TINY, project=project, suffix=suffix, job_id=job_id)
    checkpoint = checkpoint_model_name(final, 4)
    with Session(db) as session:
        owner = session.exec(select(Project).where(Project.name == project)).one()
        for name, step in ((checkpoint, 4), (final, None)):
            session.add(ModelRow(id=name, project_id=owner.id, job_id=job_id, base_model=TINY,
                                 storage_key=f"jobs/{job_id}/adapter", checkpoint_step=step))  # fmt: skip
        session.commit()
    return final, checkpoint


def project_id(db: Engine, name: str) -> str:
    with Session(db) as session:
        return session.exec(select(Project.id).where(Project.name == name)).one()


@pytest.fixture(scope="module")
def others(server: ApiServer, db: Engine) -> dict[str, str]:
    """Three other projects: name -> key."""
    return {name: server.new_key(name) for name in ("team-a", "team-b", "team-c")}


def is_granted(db: Engine, checkpoint: str, project: str) -> bool:
    with Session(db) as session:
        return granted(session, checkpoint=checkpoint, project_id=project)


def test_grant_list_delete_with_the_sdk(client, db: Engine, others: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    _, checkpoint = add_checkpoint(db)
    ids = [project_id(db, name) for name in others]
    created = client.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=[ids[0], "team-b"])
    assert [(p.object, p.project_id) for p in created] == [("checkpoint.permission", ids[0]),
                                                           ("checkpoint.permission", ids[1])]  # fmt: skip
    again = client.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=[ids[0], ids[2]])
    assert again.data[0].id == created.data[0].id  # a project granted already keeps its permission
    listed = client.fine_tuning.checkpoints.permissions.list(checkpoint)
    assert [p.project_id for p in listed.data] == [ids[2], ids[1], ids[0]]  # newest first
    assert listed.has_more is False
    first = client.fine_tuning.checkpoints.permissions.list(checkpoint, limit=1, order="ascending")
    assert [p.project_id for p in first.data] == [ids[0]] and first.has_more
    assert [p.project_id for p in client.fine_tuning.checkpoints.permissions.list(
        checkpoint, limit=1, order="ascending")] == ids  # the SDK follows `last_id`  # fmt: skip
    only = client.fine_tuning.checkpoints.permissions.list(checkpoint, project_id=ids[1])
    assert [p.project_id for p in only.data] == [ids[1]]
    deleted = client.fine_tuning.checkpoints.permissions.delete(
        only.data[0].id, fine_tuned_model_checkpoint=checkpoint
    )
    assert (deleted.id, deleted.deleted, deleted.object) == (only.data[0].id, True, "checkpoint.permission")
    assert ids[1] not in {p.project_id for p in client.fine_tuning.checkpoints.permissions.list(checkpoint)}
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.checkpoints.permissions.delete(
            only.data[0].id, fine_tuned_model_checkpoint=checkpoint
        )
    assert caught.value.param == "permission_id"  # type: ignore[attr-defined]


def test_only_the_owner_sees_permissions_and_a_grantee_only_trains(server: ApiServer, client, db: Engine,
                                                                     others: dict[str, str]) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    final, checkpoint = add_checkpoint(db, suffix="owned")
    grantee, stranger = project_id(db, "team-a"), project_id(db, "team-c")
    permission = client.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=[grantee]).data[0]
    assert is_granted(db, checkpoint, grantee) and not is_granted(db, checkpoint, stranger)
    assert not is_granted(db, final, grantee)
    guest = server.client(others["team-a"])
    for call in (
        lambda: guest.fine_tuning.checkpoints.permissions.list(checkpoint),
        lambda: guest.fine_tuning.checkpoints.permissions.create(checkpoint, project_ids=[stranger]),
        lambda: guest.fine_tuning.checkpoints.permissions.delete(
            permission.id, fine_tuned_model_checkpoint=checkpoint
        ),
        lambda: guest.models.retrieve(checkpoint),
        lambda: guest.models.delete(checkpoint),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert checkpoint not in {m.id for m in guest.models.list()}
    client.models.delete(final)  # deletes its checkpoints too: the grant no longer lets anyone use it
    assert not is_granted(db, checkpoint, grantee)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.checkpoints.permissions.list(checkpoint)


def test_bad_requests_are_400s_naming_the_field(client, db: Engine, others: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    final, checkpoint = add_checkpoint(db, suffix="bad")
    permissions = client.fine_tuning.checkpoints.permissions
    cases = [
        (lambda: permissions.create(checkpoint, project_ids=[]), "project_ids"),
        (
            lambda: permissions.create(checkpoint, project_ids=["team-a", "proj_nosuchproject"]),
            "project_ids[1]",
        ),
        (lambda: permissions.create(checkpoint, project_ids=["proj-test"]), "project_ids[0]"),
        (lambda: permissions.create(checkpoint, project_ids="team-a"), "project_ids"),  # type: ignore[arg-type]
        (lambda: permissions.list(checkpoint, limit=0), "limit"),
        (lambda: permissions.list(checkpoint, order="newest"), "order"),  # type: ignore[arg-type]
        (lambda: permissions.list(checkpoint, after="cp_unknown"), "after"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.param == param, param  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as missing:
        permissions.create(final, project_ids=["team-a"])  # a final model is not a checkpoint
    assert missing.value.param == "fine_tuned_model_checkpoint"  # type: ignore[attr-defined]
