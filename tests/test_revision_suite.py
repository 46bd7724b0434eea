"""The revision suite really catches a broken revision, and says which one."""

from __future__ import annotations

from conftest import Project, head_revision, revision


def test_a_downgrade_that_forgets_a_table_fails_the_suite(project: Project) -> None:
    project.add_revision(
        "leaky",
        revision(
            "leaky1",
            head_revision(),
            'op.create_table("coupons", sa.Column("id", sa.Integer))',
            message="add coupons",
        ),
    )  # the downgrade of revision() does nothing: the table stays behind

    result = project.revision_suite("-k", "stairway and sqlite")

    assert result.returncode == 1, result.stdout
    assert "the downgrade of revision leaky1 (add coupons) leaves a trace" in result.stdout
    assert "table coupons only after its downgrade" in result.stdout
