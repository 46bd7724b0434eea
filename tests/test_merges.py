"""A history with a branch and a merge: migrate, roll back across the merge, and the
revision suite over it."""

from __future__ import annotations

import pytest
from conftest import Project, head_revision, revision, version

HEAD = head_revision()


@pytest.fixture
def merged(project: Project) -> Project:
    """Two branches off the bundled head, each adding a table, joined by `invoke merge`."""
    for rev in ("coupons1", "refunds1"):
        body = f'op.create_table("{rev}", sa.Column("id", sa.Integer, primary_key=True))'
        text = revision(rev, HEAD, body, message=f"add {rev}")
        undo = f'def downgrade() -> None:\n    op.drop_table("{rev}")\n'
        project.add_revision(rev, text.replace("def downgrade() -> None:\n    pass\n", undo))
    project.ok("merge", "--message=join coupons and refunds")
    return project


def merge_id(project: Project) -> str:
    [path] = project.versions.glob("*join_coupons_and_refunds.py")
    return path.name.split("_")[1]


def test_rolling_back_a_merge_undoes_only_the_merge(merged: Project) -> None:
    merged.migrated()
    merge = merge_id(merged)

    result = merged.ok("rollback")

    assert f"reverted {merge}" in result.stderr
    assert sorted(version(merged)) == ["coupons1", "refunds1"]


def test_rolling_back_from_two_heads_asks_which_branch(merged: Project) -> None:
    merged.migrated()
    merged.ok("rollback")

    error = merged.fails("rollback")

    assert "the database has 2 heads" in error and "--to=" in error
    assert "Warning" not in error
    merged.ok("rollback", "--to=refunds1@-1")
    assert version(merged) == ["coupons1"]
    merged.ok("migrate")
    assert version(merged) == [merge_id(merged)]


def test_rolling_back_to_one_of_two_heads_is_refused_not_called_done(merged: Project) -> None:
    """Alembic plans nothing for it: the task said "nothing to do, the database is already
    there", exit 0, with the other branch still applied."""
    merged.migrated()
    merged.ok("rollback")  # the merge: both branches' heads are left

    error = merged.fails("rollback", "--to=coupons1")

    assert error.endswith(
        "coupons1 is one of its heads already, so rolling back to it undoes nothing; undo "
        "the other branch by itself: `invoke rollback --env=dev --to=refunds1@-1` undoes its "
        "last revision\n"
    )
    assert sorted(version(merged)) == ["coupons1", "refunds1"]
    merged.ok("rollback", "--to=refunds1@-1")
    assert version(merged) == ["coupons1"]


def test_rolling_back_to_a_revision_on_another_branch_says_so(merged: Project) -> None:
    merged.ok("migrate", "--to=coupons1")  # one branch of the two

    error = merged.fails("rollback", "--to=refunds1")

    assert error.endswith(
        "error: the dev database is at coupons1, and refunds1 is on another branch, which it "
        "has not applied: rollback only goes back; `invoke migrate --env=dev --to=refunds1` "
        "applies it\n"
    )
    assert "not a valid downgrade target" not in error
    assert version(merged) == ["coupons1"]


def test_more_than_one_step_back_across_a_merge_is_refused(merged: Project) -> None:
    merged.migrated()

    error = merged.fails("rollback", "--steps=2")

    assert "roll back the merge alone (--steps=1)" in error
    assert version(merged) == [merge_id(merged)]


def test_the_revision_suite_walks_a_merge(merged: Project) -> None:
    # the models know nothing of the two tables, so only the history's own properties run;
    # the PostgreSQL stairway is the main suite's
    suite = merged.revision_suite("-m", "not postgres", "-k", "stairway or single_head", CI="false")

    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert "2 passed" in suite.stdout  # the stairway through the merge, and one head
