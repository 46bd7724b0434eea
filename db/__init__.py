"""The shop database: environments, models, sessions and migration commands.

This package is a library: it never prints and never exits. It returns values and raises
:class:`db.errors.DbError` (or Alembic's ``CommandError``) with messages meant for users.
"""
