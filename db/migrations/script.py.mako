"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}${"(none: the first revision)" if not down_revision else ""}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401 (kept for the revision's author)
from alembic import op  # noqa: F401
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
