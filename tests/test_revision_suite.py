"""The revision suite really catches a broken revision, and says which one."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO, Project, head_revision
from test_errors import revision


def test_a_downgrade_that_forgets_a_table_fails_the_suite(project: Project) -> None:
    shutil.copytree(
        REPO / "tests", project.root / "tests", ignore=shutil.ignore_patterns("__pycache__")
    )
    project.add_revision(
        "leaky",
        revision(
            "leaky1",
            head_revision(),
            'op.create_table("coupons", sa.Column("id", sa.Integer))',
            message="add coupons",
        ),
    )  # the downgrade of revision() does nothing: the table stays behind

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_revisions.py",
            "-k",
            "stairway and sqlite",
        ],
        cwd=project.root,
        env=project.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 1, result.stdout
    assert "the downgrade of revision leaky1 (add coupons) leaves a trace" in result.stdout
    assert "table coupons only on one side" in result.stdout
