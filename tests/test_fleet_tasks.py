"""Every task on a SQLite fleet: rollback, history, check, stamp, seed, offline-sql, the
one-target tasks, the run report, a protected fleet's plan, and the progress line."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import closing

import pytest
from conftest import Project, add_coupon_model, at_the_prompt, head_revision, revision, tmpfs

HEAD = head_revision()
SHOPS = ("alpha", "beta", "gamma")
SQLITE_FLEET = "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\nTARGETS=alpha, beta gamma\n"


@pytest.fixture
def fleet(project: Project) -> Project:
    project.write_env("shops", SQLITE_FLEET)
    return project


def query(project: Project, shop: str, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(project.root / "var" / "shops" / f"{shop}.sqlite3")) as db, db:
        return list(db.execute(sql))  # and committed: a delete is kept


def versions(project: Project, shop: str) -> list[str]:
    tables = [row[0] for row in query(project, shop, "select name from sqlite_master")]
    if "alembic_version" not in tables:
        return []
    return [str(row[0]) for row in query(project, shop, "select version_num from alembic_version")]


def test_each_targets_audit_rows_name_it(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")

    for shop in SHOPS:
        rows = query(
            fleet, shop, "select revision, direction, environment, target from migration_log"
        )
        assert rows == [(HEAD, "up", "shops", shop)]


def test_rollback_on_chosen_targets_and_history_counts_them(fleet: Project) -> None:
    fleet.add_revision("second", revision("second01", HEAD))
    fleet.ok("migrate", "--env=shops")

    result = fleet.ok("rollback", "--env=shops", "--only=alpha,beta")

    assert "alpha] rolled back second01; now at " + HEAD in result.stderr
    assert [versions(fleet, shop) for shop in SHOPS] == [[HEAD], [HEAD], ["second01"]]
    history = fleet.ok("history", "--env=shops").stdout.splitlines()
    assert history[0].startswith("second01  applied on 1/3")
    assert history[1].startswith(f"{HEAD}  applied on 3/3")
    rows = json.loads(fleet.ok("history", "--env=shops", "--json").stdout)
    assert rows[0]["id"] == "second01" and rows[0]["applied_on"] == ["gamma"]


def test_a_failed_fleet_rollback_says_to_retry_only_the_target_that_failed(
    fleet: Project,
) -> None:
    fleet.add_revision("second", revision("second01", HEAD))
    fleet.ok("migrate", "--env=shops")
    (fleet.root / "var" / "shops" / "beta.sqlite3").write_bytes(b"this is no database" * 100)

    result = fleet.invoke("rollback", "--env=shops", "--keep-going", "--steps=2")

    assert result.returncode == 6, result.stderr
    assert [versions(fleet, shop) for shop in ("alpha", "gamma")] == [[], []]
    # a plain rerun would take alpha and gamma further back, and --steps would count again
    # from where a target stopped: beta alone, to a revision
    last = "error: 1 failed of 3 targets; retry only them with --only=beta --to=REV\n"
    assert result.stderr.endswith(last)
    again = fleet.invoke("rollback", "--env=shops", "--keep-going", "--to=base")
    assert again.stderr.endswith("error: 1 failed of 3 targets; retry only them with --only=beta\n")


def test_check_on_a_fleet_names_the_target_behind(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops", "--only=alpha,gamma")

    result = fleet.invoke("check", "--env=shops")

    assert result.returncode == 5, result.stderr
    assert "[1/3 alpha] check passed" in result.stderr or "alpha] check passed" in result.stderr
    assert "beta] check failed: 1 revision(s) pending" in result.stderr
    assert f"(2 at {HEAD})" in result.stderr  # a check's problems carry no revision to count
    assert result.stderr.endswith("\ncheck failed on 1 of 3 targets\n")
    fleet.ok("migrate", "--env=shops")
    assert fleet.ok("check", "--env=shops").stderr.count("check passed") == 3
    add_coupon_model(fleet)  # a fleet's makemigration needs the target to compare with
    drift = "`invoke makemigration --env=shops --only=beta` would write: add_table coupons"
    assert drift in fleet.invoke("check", "--env=shops", "--only=beta").stderr


def test_stamp_and_seed_on_every_target(fleet: Project) -> None:
    refused = fleet.invoke("stamp", "--env=shops", HEAD, "--only=alpha")  # empty: not HEAD's
    assert refused.returncode == 4 and "the shops.alpha database is not what revision" in (
        refused.stderr
    )
    stamped = fleet.ok("stamp", "--env=shops", HEAD, "--force")

    assert stamped.stderr.count(f"recorded {HEAD} as applied") == 3
    assert all(versions(fleet, shop) == [HEAD] for shop in SHOPS)
    again = fleet.ok("stamp", "--env=shops", HEAD, "--force").stderr
    assert again.count(f"already at {HEAD} (nothing recorded)") == 3 and "3 up to date" in again
    for shop in SHOPS:  # --force over empty databases: the tables are not there to seed
        query(fleet, shop, "drop table alembic_version")
    unseeded = fleet.invoke("seed", "--env=shops", "--only=beta")
    assert unseeded.returncode == 6, unseeded.stderr
    assert "cannot seed shops.beta: no such table: users" in unseeded.stderr  # which database
    assert "shops: 1 target: 1 failed\n" in unseeded.stderr  # no version was read to count
    fleet.ok("migrate", "--env=shops")
    query(fleet, "gamma", "delete from migration_log")  # its files can no longer be checked
    unchecked = fleet.invoke("check", "--env=shops").stderr
    assert " gamma] check failed: 1 applied revision(s) have no checksum" in unchecked
    assert f"`invoke stamp --env=shops --only=gamma {HEAD}`" in unchecked
    assert "check failed on 1 of 3 targets" in unchecked
    adopted = fleet.ok("stamp", "--env=shops", HEAD).stderr
    assert "2 up to date" in adopted and "1 stamped" in adopted
    assert f"recorded the checksums of 1 revision(s) applied without any: {HEAD}" in adopted
    assert query(fleet, "gamma", "select direction from migration_log") == [("stamp",)]
    seeded = fleet.ok("seed", "--env=shops")
    assert seeded.stderr.count("added 3 users") == 3
    again = fleet.ok("seed", "--env=shops", "--only=beta").stderr
    assert "[1/1 beta] the sample shop is already there: nothing added" in again
    assert all(query(fleet, shop, "select count(*) from users") == [(3,)] for shop in SHOPS)


def test_offline_sql_gives_each_target_its_own_audit_rows_and_schema(project: Project) -> None:
    project.write_env(
        "tenants",
        "DATABASE_URL=postgresql+asyncpg://shop@db.invalid/shops\nSCHEMA={target}\n"
        "TARGETS=alpha beta\n",
    )

    result = project.ok("offline-sql", "--env=tenants", "--output=out")

    for shop in ("alpha", "beta"):
        sql = (project.root / "out" / f"{shop}.sql").read_text()
        assert f"nspname = '{shop}') THEN CREATE SCHEMA \"{shop}\"; END IF" in sql
        assert f'SET search_path TO "{shop}"' in sql
        assert f"CREATE TABLE {shop}.alembic_version" in sql
    assert "wrote the SQL for tenants beta to" in result.stderr
    printed = project.ok("offline-sql", "--env=tenants").stdout
    assert printed.startswith("-- target: alpha\n") and "-- target: beta\n" in printed
    project.write_env("shops", "DATABASE_URL=postgresql+asyncpg://s@db.invalid/shop_{target}\n")
    project.extend_env("shops", "TARGETS=alpha beta\n")
    printed = project.ok("offline-sql", "--env=shops").stdout
    alpha, beta = printed.removeprefix("-- target: alpha\n").split("-- target: beta\n")
    for shop, sql in (("alpha", alpha), ("beta", beta)):  # the same DDL, each its own audit row
        assert sql.count("CREATE TABLE alembic_version") == 1
        assert f"'{HEAD}', 'up', 'shops'," in audit_row(sql) and f", '{shop}')" in audit_row(sql)
    project.ok("offline-sql", "--env=shops", "--output=each")
    assert ", 'beta')" in audit_row((project.root / "each" / "beta.sql").read_text())
    alpha_only = project.ok("offline-sql", "--env=shops", "--output=each", "--only=alpha").stderr
    assert alpha_only.endswith(  # a deploy that applies each/*.sql would run beta's again
        "warning: each also holds beta.sql, which this run did not write (an earlier run's): "
        "apply only the files listed above\n"
    )
    (project.root / "one.sql").write_text("")
    no_folder = "is no folder: on a fleet, --output names a folder (a file per target); "
    no_folder += "without it, every target's SQL is printed\n"
    to_a_file = project.fails("offline-sql", "--env=shops", "--output=one.sql")
    assert to_a_file.endswith(f"one.sql {no_folder}")
    # the stream, not the pipe or terminal it leads to ("cannot write the SQL to
    # /proc/123/fd/pipe:[4567]/alpha.sql: No such file or directory")
    to_stdout = project.fails("offline-sql", "--env=shops", "--output=/dev/stdout")
    assert to_stdout == f"error: /dev/stdout {no_folder}"
    for flag in ("--to=nope", "--from=nope"):  # the fleet's history, not its first target's
        unknown = project.fails("offline-sql", "--env=shops", flag)
        assert unknown.endswith(
            "No such revision or branch 'nope'; see `invoke history --env=shops`\n"
        )
    project.write_env("shops", "DATABASE_URL=sqlite:///var/{target}.sqlite3\nTARGETS=, ,\n")
    assert "shops: TARGETS names no targets" in project.fails("status", "--env=shops")


def audit_row(sql: str) -> str:
    """The one ``migration_log`` row an offline script writes (one revision)."""
    (row,) = [line for line in sql.splitlines() if line.startswith("INSERT INTO migration_log")]
    return row


def test_one_database_tasks_take_one_target_of_a_fleet(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")

    error = fleet.fails("reset", "--env=shops")
    assert "shops is a fleet" in error and "--only=NAME" in error
    reset = fleet.ok("reset", "--env=shops", "--only=beta")
    assert "[shops.beta] sqlite:///" in reset.stderr and "/var/shops/beta.sqlite3" in reset.stderr
    assert "\nshops.beta: reset and migrated 1 revision in " in reset.stderr  # not "shops:"
    assert versions(fleet, "beta") == [HEAD]
    kept = [p.name for p in (fleet.root / "var" / "backups").iterdir()]
    assert len(kept) == 1 and kept[0].startswith("shops.beta-")  # its own backup, by name
    restored = fleet.ok("restore", "--env=shops", "--only=beta").stderr
    assert f"shops.beta: restored var/backups/{kept[0]}" in restored


def hinted(output: str, task: str) -> list[str]:
    """The arguments of the `invoke TASK ...` command a message tells the user to run."""
    found = re.search(rf"`invoke ({task} [^`]*)`", output)
    assert found, output
    return found.group(1).split()


def test_a_targets_messages_name_a_command_that_works_on_it(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops", "--only=alpha,gamma")
    unmade = fleet.ok("status", "--env=shops")  # as one database's status says it
    assert unmade.stderr.count("there is no database at") == 1
    assert "\n  there is no database at var/shops/beta.sqlite3 yet: `invoke" in unmade.stderr
    assert "no database" not in unmade.stdout  # the data alone
    fleet.ok(*hinted(unmade.stderr, "migrate"))
    assert versions(fleet, "beta") == [HEAD]
    fleet.add_revision("second", revision("second01", HEAD))
    fleet.ok("migrate", "--env=shops")  # each target backed up at HEAD first
    (fleet.root / "var" / "shops" / "beta.sqlite3").write_bytes(b"not a database" * 100)

    corrupt = fleet.invoke("migrate", "--env=shops").stderr
    fleet.ok(*hinted(corrupt, "restore"))
    assert versions(fleet, "beta") == [HEAD]

    second = fleet.versions / "second.py"
    second.write_text(second.read_text() + "EDITED_AFTER_IT_WAS_APPLIED = True\n")
    fleet.add_revision("third", revision("third001", "second01"))
    changed = fleet.ok("migrate", "--env=shops", "--only=alpha").stderr
    assert "] migrated: third001\n  warning: db/migrations/versions/second.py changed" in changed
    newest = max((fleet.root / "var" / "runs").glob("shops-*.json"))
    [notes] = [t["notes"] for t in json.loads(newest.read_text())["targets"]]
    assert any(note.startswith("warning: db/migrations/versions/second.py") for note in notes)
    again = fleet.ok("migrate", "--env=shops", "--only=alpha").stderr  # as one database warns
    assert "] already at third001\n  warning: db/migrations/versions/second.py changed" in again
    status = fleet.ok("status", "--env=shops", "--only=alpha")  # so does its status
    assert status.stdout == "[1/1 alpha] at third001, nothing pending\n"  # the data alone
    assert "\n  warning: db/migrations/versions/second.py changed after revision" in status.stderr
    accepted = fleet.ok(*hinted(changed, "accept-changes")).stderr  # on every target
    assert "alpha] accepted second01 as it is now" in accepted  # and gamma, where it is applied
    assert "gamma] accepted second01" in accepted and "beta] second01 is not applied" in accepted
    back = fleet.ok("rollback", "--env=shops", "--only=alpha").stderr
    assert "warning" not in back and versions(fleet, "alpha") == ["second01"]


def test_accept_changes_records_an_edited_file_on_every_target(fleet: Project) -> None:
    """accept-changes took one target at a time: a file edited after a protected fleet
    applied it stopped every target's migrate, and each needed its own command (--only)."""
    fleet.extend_env("shops", "PROTECTED=true\n")
    fleet.ok("migrate", "--env=shops", "--yes")
    fleet.ok("rollback", "--env=shops", "--only=gamma", "--yes")
    [path] = fleet.versions.glob(f"*_{HEAD}_*.py")
    path.write_text(path.read_text() + "\nEDITED = True\n")  # code, not a comment: it counts
    # a target with nothing to do was "already at" it, where one database is refused
    stopped = fleet.invoke("migrate", "--env=shops", "--yes", "--keep-going")
    assert stopped.returncode == 4, stopped.stderr
    for shop in ("alpha", "beta"):
        assert f"{shop}] failed: db/migrations/versions/" in stopped.stderr
    refusal = f"  2 target(s): refused: db/migrations/versions/{path.name} changed after "
    assert refusal in stopped.stderr  # one line for both: one command accepts it on both
    assert "gamma] migrated" in stopped.stderr and "already at" not in stopped.stderr
    assert hinted(stopped.stderr, "accept-changes") == ["accept-changes", "--env=shops", HEAD]
    status = fleet.invoke("status", "--env=shops", "--check")  # refused, as on one database
    assert status.returncode == 4, status.stderr
    assert "beta] failed: db/migrations/versions/" in status.stdout
    assert "shops: 3 targets: 2 failed" in status.stderr
    fleet.ok("rollback", "--env=shops", "--only=gamma", "--yes")

    refused = fleet.invoke("accept-changes", HEAD, "--env=shops")
    accepted = fleet.ok("accept-changes", HEAD[:6], "--env=shops", "--yes").stderr

    assert refused.returncode == 4 and "pass --yes" in refused.stderr  # asked once, for all
    for shop in ("alpha", "beta"):
        assert f"{shop}] accepted {HEAD} as it is now" in accepted
        [row] = query(fleet, shop, "select target from migration_log where direction = 'accept'")
        assert row == (shop,)
    assert f"gamma] {HEAD[:6]} is not applied: nothing to accept (a migrate runs" in accepted
    assert "shops: 3 targets: 2 accepted, 1 not applied" in accepted
    assert not query(fleet, "gamma", "select 1 from migration_log where direction = 'accept'")
    fleet.ok("migrate", "--env=shops", "--yes")  # gamma runs the file as it is now
    assert [versions(fleet, shop) for shop in SHOPS] == [[HEAD]] * 3
    again = fleet.ok("accept-changes", HEAD, "--env=shops", "--yes").stderr
    assert f"3 targets: 3 as recorded ({3} at {HEAD})" in again
    unknown = fleet.fails("accept-changes", "feed1234", "--env=shops", "--yes")
    assert "No such revision or branch 'feed1234'" in unknown and "[1/3" not in unknown


def test_a_run_report_is_kept_and_printed_with_json(fleet: Project) -> None:
    result = fleet.ok("migrate", "--env=shops", "--json")

    report = json.loads(result.stdout)
    kept = list((fleet.root / "var" / "runs").glob("shops-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == report
    assert report["task"] == "migrate" and report["exit_code"] == 0
    assert report["counts"] == {"migrated": 3}
    assert [t["target"] for t in report["targets"]] == list(SHOPS)
    assert all(t["current"] == [HEAD] and t["detail"] == HEAD for t in report["targets"])
    fleet.extend_env("shops", "RUNS_KEEP=2\n")
    for _ in range(2):
        fleet.ok("migrate", "--env=shops")
    kept_now = sorted(p.name for p in (fleet.root / "var" / "runs").glob("shops-*.json"))
    assert len(kept_now) == 2 and kept[0].name not in kept_now  # the oldest went


@pytest.mark.parametrize(
    ("task", "counts"),
    [
        (["rollback"], {"rolled back": 3}),
        (["stamp", HEAD], {"up to date": 3}),
        (["accept-changes", HEAD], {"as recorded": 3}),
        (["seed"], {"seeded": 3}),
    ],
)
def test_every_task_that_keeps_a_report_prints_it_with_json(
    fleet: Project, task: list[str], counts: dict[str, int]
) -> None:
    """Only migrate took --json: a deploy that rolled a fleet back had to find the report
    in var/runs/ itself."""
    fleet.ok("migrate", "--env=shops")

    result = fleet.ok(*task, "--env=shops", "--json")

    report = json.loads(result.stdout)
    newest = max((fleet.root / "var" / "runs").glob("shops-*.json"))
    assert json.loads(newest.read_text()) == report
    assert report["task"] == task[0] and report["counts"] == counts


def test_a_fleet_whose_name_starts_like_another_prunes_only_its_own_reports(
    fleet: Project,
) -> None:
    """shops-eu's reports, shops-eu-STAMP.json, start with "shops-": RUNS_KEEP=1 on shops
    deleted them, and then, as they sort after shops' own, the report just written too."""
    fleet.write_env("shops-eu", SQLITE_FLEET.replace("var/shops/", "var/eu/"))
    for _ in range(2):
        fleet.ok("migrate", "--env=shops-eu")
    fleet.extend_env("shops", "RUNS_KEEP=1\n")

    result = fleet.ok("migrate", "--env=shops")

    runs = fleet.root / "var" / "runs"
    written = result.stderr.split("report: ")[1].split()[0]
    assert (fleet.root / written).is_file()
    assert len(list(runs.glob("shops-eu-*.json"))) == 2


def test_what_a_revision_prints_never_mixes_into_json_or_sql_on_stdout(fleet: Project) -> None:
    """A revision's own print (progress of a backfill, when imported or when it runs) went
    to stdout, where it broke `--json | jq` and the SQL that offline-sql prints."""
    chatty = 'print("backfilling 3 rows")'
    body = revision("chatty01", HEAD, chatty).replace("import sqlalchemy as sa\n", f"{chatty}\n", 1)
    fleet.add_revision("chatty", body)

    migrated = fleet.ok("migrate", "--env=shops", "--json")
    sql = fleet.ok("offline-sql", "--env=shops").stdout
    status = fleet.ok("status", "--env=shops", "--json").stdout

    assert json.loads(migrated.stdout)["counts"] == {"migrated": 3}
    assert migrated.stderr.count("backfilling 3 rows") >= 3  # where the user still sees it
    assert "backfilling" not in sql and sql.startswith("-- target: alpha\n")
    assert len(json.loads(status)["targets"]) == 3
    one = fleet.ok("offline-sql", "--env=dev").stdout
    assert "backfilling" not in one and one.lstrip().upper().startswith(("CREATE", "BEGIN"))


def test_runs_keep_0_keeps_no_report_and_names_none(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops", "--only=alpha")
    fleet.extend_env("shops", "RUNS_KEEP=0\n")

    result = fleet.ok("migrate", "--env=shops", "--json")

    assert "report:" not in result.stderr  # it would name a file that is not there
    assert json.loads(result.stdout)["counts"] == {"migrated": 2, "up to date": 1}
    assert not list((fleet.root / "var" / "runs").glob("shops-*.json"))


@pytest.mark.parametrize("value", ["x", "nan", "inf", "2.5", "-1"])
def test_a_bad_runs_keep_is_refused_before_any_target_runs(fleet: Project, value: str) -> None:
    fleet.extend_env("shops", f"RUNS_KEEP={value}\n")

    result = fleet.invoke("migrate", "--env=shops")

    assert result.returncode == 2, result.stderr
    assert f"shops.env: RUNS_KEEP must be a whole number, 0 or more, not '{value}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (fleet.root / "var" / "shops").exists()  # no target ran


def test_a_report_that_cannot_be_written_does_not_fail_the_run(fleet: Project) -> None:
    (fleet.root / "var").mkdir()
    (fleet.root / "var" / "runs").write_text("not a folder\n")  # as a full disk would refuse

    result = fleet.invoke("migrate", "--env=shops", "--json")

    assert result.returncode == 0, result.stderr
    assert "warning: cannot write the run's report to var/runs" in result.stderr
    assert json.loads(result.stdout)["counts"] == {"migrated": 3}
    assert all(versions(fleet, shop) == [HEAD] for shop in SHOPS)


def test_sql_that_does_not_fit_on_the_disk_leaves_no_part_of_a_file(fleet: Project) -> None:
    with tmpfs(fleet.root / "out", "8k") as out:  # two files of offline SQL fit, not three
        result = fleet.invoke("offline-sql", "--env=shops", "--output=out")

        assert result.returncode == 2, result.stderr
        assert "cannot write the SQL to" in result.stderr and "No space left on device" in (
            result.stderr
        )
        written = {p.name: p.read_text() for p in out.iterdir()}
        assert set(written) < {"alpha.sql", "beta.sql", "gamma.sql"}  # none half written
        for name, sql in written.items():  # each ends with its target's audit row
            assert sql.rstrip().endswith(f"'{name.removesuffix('.sql')}');"), name
        first = min(written)  # written again, it does not fit: the old one stays whole
        only = f"--only={first.removesuffix('.sql')}"
        again = fleet.invoke("offline-sql", "--env=shops", only, "--output=out")
        assert again.returncode == 2 and "No space left on device" in again.stderr
        assert (out / first).read_text() == written[first]
        assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temporary file


def test_a_report_on_a_full_disk_is_a_warning_and_leaves_no_part_of_a_file(
    fleet: Project,
) -> None:
    with tmpfs(fleet.root / "var" / "runs", "4k") as runs:
        (runs / "filler").write_bytes(b"x" * 3000)  # the one page is taken

        result = fleet.invoke("migrate", "--env=shops")

        assert result.returncode == 0, result.stderr
        assert "No space left on device; the run itself is as printed above" in result.stderr
        assert [p.name for p in runs.iterdir()] == ["filler"]


def test_a_protected_fleet_shows_its_plan_and_asks_once(project: Project) -> None:
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    refused = project.invoke("migrate", "--env=shops")
    assert refused.returncode == 4, refused.stderr
    assert f"3 target(s): {HEAD}  [alpha, beta, gamma]" in refused.stderr
    assert not (project.root / "var" / "shops" / "alpha.sqlite3").exists() or not versions(
        project, "alpha"
    )

    assert "{target}.sqlite3  (a fleet, protected)" in project.ok("envs").stdout
    project.ok("migrate", "--env=shops", "--yes", "--only=alpha")
    result = project.ok("migrate", "--env=shops", "--yes")

    assert "1 target(s): nothing (at head)  [alpha]" in result.stderr
    assert f"2 target(s): {HEAD}  [beta, gamma]" in result.stderr
    assert "2 migrated" in result.stderr
    assert all(versions(project, shop) == [HEAD] for shop in SHOPS)
    assert "shops: 3 targets: 1 up to date, 2 migrated" in result.stderr  # alpha's too
    again = project.ok("migrate", "--env=shops", "--json")  # it printed no JSON at all
    assert "shops: 3 targets: 3 up to date" in again.stderr
    assert json.loads(again.stdout)["counts"] == {"up to date": 3}
    refused = project.invoke("rollback", "--env=shops")
    assert refused.returncode == 4 and "pass --yes" in refused.stderr
    assert all(versions(project, shop) == [HEAD] for shop in SHOPS)


def test_a_protected_fleets_plan_is_short_and_says_why_a_target_is_unreadable(
    project: Project,
) -> None:
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    down = HEAD
    for rev in ("second01", "third001", "fourth01"):
        project.add_revision(rev, revision(rev, down))
        down = rev
    (project.root / "var" / "shops").mkdir(parents=True)
    (project.root / "var" / "shops" / "beta.sqlite3").write_bytes(b"no database" * 100)

    plan = project.invoke("migrate", "--env=shops").stderr

    assert f"2 target(s): 4 revisions, {HEAD} to fourth01  [alpha, gamma]" in plan
    assert "1 target(s): unreadable: cannot read its version: DatabaseError: file is not a " in plan


def test_a_protected_fleets_plan_for_to_rev_shows_what_migrate_applies(project: Project) -> None:
    """With --to=REV the plan listed every revision to head, and a target past REV was
    left out of the run without a word (exit 0), where an unprotected fleet refuses it."""
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    project.add_revision("second", revision("second01", HEAD))
    project.add_revision("third", revision("third001", "second01"))
    project.ok("migrate", "--env=shops", "--yes", "--only=gamma")
    project.ok("migrate", "--env=shops", "--yes", "--only=beta", "--to=second01")

    good = project.ok("migrate", "--env=shops", "--yes", "--to=second01", "--only=alpha,beta")

    assert f"1 target(s): {HEAD}, second01  [alpha]" in good.stderr
    assert "1 target(s): nothing (at second01)  [beta]" in good.stderr
    assert "third001" not in good.stderr
    assert versions(project, "alpha") == ["second01"]
    past = project.invoke("migrate", "--env=shops", "--yes", "--to=second01")
    assert past.returncode == 6, past.stderr
    assert "1 target(s): past second01: refused, migrate only goes forward  [gamma]" in (
        past.stderr
    )
    assert "gamma] failed: the shops.gamma database is at third001, past second01" in (past.stderr)
    assert versions(project, "gamma") == ["third001"]
    nowhere = project.invoke("migrate", "--env=shops", "--yes", "--to=+1", "--only=gamma")
    assert nowhere.returncode == 6, nowhere.stderr
    assert (
        "1 target(s): refused: no revision comes after the database's current one, so +1 leads"
        " nowhere" in nowhere.stderr
    )
    assert "unreadable" not in nowhere.stderr


def test_a_protected_fleets_rollback_shows_what_it_would_undo(project: Project) -> None:
    """On one database a protected rollback shows its plan; a fleet's asked for --yes to
    "roll back every chosen target" without a word of what each would undo."""
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    project.add_revision("second", revision("second01", HEAD))
    project.ok("migrate", "--env=shops", "--yes")
    project.ok("rollback", "--env=shops", "--yes", "--only=gamma")

    refused = project.invoke("rollback", "--env=shops")

    assert refused.returncode == 4, refused.stderr
    assert "  2 target(s): undo second01  [alpha, beta]\n" in refused.stderr
    assert f"  1 target(s): undo {HEAD}  [gamma]\n" in refused.stderr
    assert "to roll back 3 target(s) of it, pass --yes" in refused.stderr
    assert [versions(project, shop) for shop in SHOPS] == [["second01"], ["second01"], [HEAD]]
    to = project.invoke("rollback", "--env=shops", "--yes", "--to=second01")
    assert to.returncode == 6, to.stderr
    assert "  2 target(s): nothing to undo  [alpha, beta]\n" in to.stderr
    assert "  1 target(s): refused: the shops.{target} database is at " in to.stderr  # [gamma]
    assert "gamma] failed: the shops.gamma database is at " in to.stderr
    base = project.ok("rollback", "--env=shops", "--yes", "--to=base", "--only=gamma")
    assert "1 target(s): undo " in base.stderr and versions(project, "gamma") == []
    none = project.ok("rollback", "--env=shops", "--yes", "--only=gamma")
    assert "shops: 1 target: 1 unchanged (1 at base)" in none.stderr


def test_a_protected_fleets_plan_shows_the_targets_a_guard_refuses(project: Project) -> None:
    """The plan showed what a target would apply, and the run then refused it: its audit
    trail is another environment's (a second env file for the same databases), or a file
    it applied has changed since."""
    project.write_env("shops", SQLITE_FLEET)
    project.ok("migrate", "--env=shops", "--only=alpha")
    project.write_env("copy", SQLITE_FLEET + "PROTECTED=true\n")
    project.add_revision("second", revision("second01", HEAD))

    plan = project.invoke("migrate", "--env=copy", "--yes", "--keep-going")

    assert plan.returncode == 4, plan.stderr
    assert "  1 target(s): refused: this database was last migrated as 'shops', not 'copy'" in (
        plan.stderr
    )
    assert f"  2 target(s): {HEAD}, second01  [beta, gamma]\n" in plan.stderr
    assert [versions(project, shop) for shop in SHOPS] == [[HEAD], ["second01"], ["second01"]]

    project.extend_env("shops", "PROTECTED=true\n")
    [first] = project.versions.glob(f"*{HEAD}*.py")
    first.write_text(first.read_text(encoding="utf-8") + "\nEDITED = True\n", encoding="utf-8")

    changed = project.invoke("migrate", "--env=shops", "--only=alpha")  # nothing to confirm

    assert changed.returncode == 4, changed.stderr
    assert f"  1 target(s): refused: {first.relative_to(project.root)} changed after " in (
        changed.stderr
    )
    assert f"alpha] failed: {first.relative_to(project.root)} changed after " in changed.stderr
    assert "pass --yes" not in changed.stderr
    assert versions(project, "alpha") == [HEAD]


def test_a_protected_fleets_plan_says_a_refusal_of_many_targets_once(fleet: Project) -> None:
    """Targets refused for one cause (the code checked out is older than the databases)
    took a line of the plan each, lines that differed only in the target's name: a fleet
    of thirty had thirty for one cause."""
    fleet.extend_env("shops", "PROTECTED=true\n")
    fleet.ok("migrate", "--env=shops", "--yes")
    for shop in SHOPS:
        query(fleet, shop, "update alembic_version set version_num = 'dead00000009'")

    result = fleet.invoke("migrate", "--env=shops", "--yes", "--keep-going")

    assert result.returncode == 6, result.stderr
    assert (
        "plan for 3 targets:\n  3 target(s): refused: the shops.{target} database is at "
        "revision dead00000009, which is not in db/migrations/versions: "
    ) in result.stderr
    assert "`invoke stamp --env=shops --only={target} NEW` records it)  [alpha, beta, gamma]\n" in (
        result.stderr
    )
    for shop in SHOPS:  # each target's own line names it, and its own command
        said = f"{shop}] failed: the shops.{shop} database is at revision dead00000009"
        assert said in result.stderr and f"--only={shop} NEW" in result.stderr
        assert versions(fleet, shop) == ["dead00000009"]


def test_a_target_a_guard_refuses_is_no_canary(project: Project) -> None:
    """A canary whose run a guard refuses (its trail is another environment's) proves
    nothing about the revisions, yet its failure kept every other target from running."""
    project.write_env("shops", SQLITE_FLEET)
    project.ok("migrate", "--env=shops", "--only=alpha")
    project.write_env("copy", SQLITE_FLEET)
    project.add_revision("second", revision("second01", HEAD))

    run = project.invoke("migrate", "--env=copy", "--canary=1", "--jobs=1")

    assert run.returncode == 4, run.stderr
    assert run.stderr.index("beta] migrated") < run.stderr.index("alpha] failed: this database")
    assert "gamma] skipped (after a failure)" in run.stderr  # after the canaries, as ever
    assert [versions(project, shop) for shop in SHOPS] == [[HEAD], ["second01"], []]


def confirmed_while(project: Project, task: str, *meanwhile: Callable[[], object]) -> str:
    """A protected fleet's ``task`` confirmed at its prompt, once what happens ``meanwhile``
    (other runs, between the plan and the answer) is done; what it said, and its exit code.
    A rollback takes --yes, and on a terminal the typed name as well. It keeps going, so
    that a target refused does not stop the others, whatever the order they run in."""
    args = (task, "--env=shops", "--keep-going", *(("--yes",) if task == "rollback" else ()))
    with at_the_prompt(project, *args) as (process, controller, said):
        for change in meanwhile:
            change()
        os.write(controller, b"shops\n")
        said += process.communicate(timeout=60)[1]
    return f"{said.decode()}exit {process.returncode}\n"


def test_a_protected_fleet_runs_only_what_its_plan_showed(project: Project) -> None:
    """The plan is read without the targets' locks, then confirmed; each target then did
    whatever it would do by the time it ran. A rollback confirmed to undo second01 on a
    target that another run had rolled back meanwhile undid the shop's tables as well."""
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    project.add_revision("second", revision("second01", HEAD))
    project.ok("migrate", "--env=shops", "--yes")

    back = ("rollback", "--env=shops", "--yes")
    said = confirmed_while(project, "rollback", lambda: project.ok(*back, "--only=alpha"))

    assert "  3 target(s): undo second01  [alpha, beta, gamma]\n" in said
    assert (
        "alpha] failed: the plan changed while it was being confirmed (another run changed the "
        f"database meanwhile: the plan was second01, and is now {HEAD}): nothing was changed"
    ) in said
    assert said.endswith(
        "error: 1 failed of 3 targets; retry only them with --only=alpha\nexit 4\n"
    )
    assert [versions(project, shop) for shop in SHOPS] == [[HEAD], [HEAD], [HEAD]]

    # what is left of a plan that another run carried out is run; a plan changed is not
    said = confirmed_while(
        project,
        "migrate",
        lambda: project.ok("migrate", "--env=shops", "--yes", "--only=beta"),
        lambda: project.ok(*back, "--to=base", "--only=gamma"),
    )

    assert "  3 target(s): second01  [alpha, beta, gamma]\n" in said
    assert "alpha] migrated: second01\n" in said
    assert "beta] already at second01\n" in said
    assert f"the plan was second01, and is now {HEAD}, second01): nothing was changed" in said
    assert said.endswith("exit 4\n")
    assert [versions(project, shop) for shop in SHOPS] == [["second01"], ["second01"], []]


def test_a_protected_fleet_does_not_run_a_target_its_plan_could_not_read(
    project: Project,
) -> None:
    """A target shown as unreadable was run all the same: had it become readable by then,
    it was migrated with no plan confirmed for it."""
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    gamma = project.root / "var" / "shops" / "gamma.sqlite3"
    gamma.parent.mkdir(parents=True)
    gamma.write_bytes(b"not a database, for now" * 100)

    said = confirmed_while(project, "migrate", gamma.unlink)  # a file it could migrate now

    assert "  1 target(s): unreadable: cannot read its version: " in said
    assert "Type its name to migrate 2 target(s) of: " in said
    assert "gamma] failed: not run, as its plan was not read: cannot read its version:" in said
    assert said.endswith("exit 6\n")
    assert [versions(project, shop) for shop in SHOPS] == [[HEAD], [HEAD], []]


def test_a_protected_fleets_plan_groups_the_targets_of_a_server_that_is_down(
    project: Project,
) -> None:
    """Each target's reason names its own URL: a down server made a plan line per target.
    A target with a URL of its own, on another server, was said to be on the fleet's."""
    with socket.socket() as probe, socket.socket() as other:  # ports nothing listens on
        probe.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        port, far = probe.getsockname()[1], other.getsockname()[1]
    url = f"postgresql+asyncpg://shop@127.0.0.1:{port}/shop_{{target}}"
    own = f"postgresql+asyncpg://shop@127.0.0.1:{far}/shop_far"
    (project.root / "shops.txt").write_text(f"alpha\nbeta\nfar {own}\n")
    project.write_env("shops", f"DATABASE_URL={url}\nTARGETS_FILE=shops.txt\nPROTECTED=true\n")

    plan = project.invoke("migrate", "--env=shops").stderr

    assert f"2 target(s): unreadable: cannot connect to {url}: Connection refused" in plan
    assert f"1 target(s): unreadable: cannot connect to {own}: Connection refused" in plan
    assert plan.count("unreadable") == 2 and "[alpha, beta]" in plan and "[far]" in plan


def on_a_terminal(project: Project, *args: str) -> str:
    """What a task writes to a terminal (stdout and stderr), once it exits 0."""
    leader, follower = pty.openpty()
    process = project.start(*args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 4096) if ready else b""
        except OSError:  # the task ended and closed the terminal
            chunk = b""
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, seen.decode()
    return seen.decode()


def test_a_terminal_shows_a_progress_line(fleet: Project) -> None:
    text = on_a_terminal(fleet, "migrate", "--env=shops", "--jobs=1")

    assert "\r\x1b[K1/3 done, 0 running, 0 failed" in text
    assert "\r\x1b[K2/3 done, 1 running, 0 failed" in text
    assert "[3/3 gamma] migrated" in text


def test_the_progress_line_counts_only_targets_that_run(fleet: Project) -> None:
    """A target the plan found already there (or a canary's read did) is done without
    having started: the progress line said "-1 running"."""
    fleet.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    fleet.ok("migrate", "--env=shops", "--yes", "--only=alpha")

    text = on_a_terminal(fleet, "migrate", "--env=shops", "--yes", "--jobs=1")

    assert "[1/3 alpha] already at " in text
    assert "\r\x1b[K1/3 done, 0 running, 0 failed" in text
    assert " -1 running" not in text


def test_status_check_gates_a_deploy_on_every_target(fleet: Project) -> None:
    """`status --check || migrate`: exit 5 while any target is behind, 0 once all are there."""
    fleet.ok("migrate", "--env=shops", "--only=alpha,beta")

    behind = fleet.invoke("status", "--env=shops", "--check")

    assert behind.returncode == 5, behind.stderr
    assert "shops: targets behind head" in behind.stderr
    # the summary says which targets are behind, not only that each was read
    assert "3 targets: 2 at head, 1 behind (2 at " in behind.stderr
    assert "\n  behind      gamma\n" in behind.stderr
    assert json.loads(fleet.ok("status", "--env=shops", "--json").stdout)["counts"] == {
        "at head": 2,
        "behind": 1,
    }
    fleet.ok("migrate", "--env=shops")
    assert fleet.invoke("status", "--env=shops", "--check").returncode == 0


def test_a_target_that_cannot_be_read_fails_status_and_is_named(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")
    (fleet.root / "var" / "shops" / "beta.sqlite3").write_bytes(b"this is no database" * 100)

    result = fleet.invoke("status", "--env=shops")

    assert result.returncode == 6, result.stderr
    assert "beta] failed: cannot read its version: DatabaseError: file is not a database" in (
        result.stdout
    )
    # what to do, as on one database
    restore = "the SQLite file is corrupt: put a good backup back with `invoke restore "
    assert f"{restore}--env=shops --only=beta`" in result.stdout
    assert "error: 1 failed of 3 targets\n" in result.stderr  # status: nothing to rerun
    assert "Traceback" not in result.stderr
    history = fleet.invoke("history", "--env=shops")  # printed nothing but the failure
    assert history.returncode == 6, history.stderr
    assert history.stdout.endswith(
        f"{HEAD}  applied on 2/2  create shop tables: users, categories, products, purchases\n"
    )
    rows = json.loads(fleet.invoke("history", "--env=shops", "--json").stdout)
    assert rows[0]["applied_on"] == ["alpha", "gamma"]
    none_read = fleet.invoke("history", "--env=shops", "--only=beta")
    assert none_read.returncode == 6 and none_read.stdout == ""  # not "applied on 0/0"
    bad = fleet.invoke("migrate", "--env=shops", "--to=+2")  # relative: each target's own
    assert bad.returncode == 6 and "so +2 leads nowhere" in bad.stderr
    assert "see `invoke status --env=shops --only=alpha`" in bad.stderr
    back = fleet.invoke("migrate", "--env=shops", "--to=-1")  # the other way: refused once
    assert back.returncode == 1, back.stderr
    assert back.stderr.count("migrate only goes forward: `invoke rollback --env=shops") == 1
    assert "[" not in back.stderr.split("\n", 1)[1]  # no target started


def test_a_target_placeholder_with_no_targets_named_is_refused(project: Project) -> None:
    project.write_env("shops", "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\nTARGETS=\n")

    error = project.fails("migrate", "--env=shops")

    assert "shops: DATABASE_URL has {target}, but no targets are named" in error
    assert not (project.root / "var" / "shops").exists()


def test_a_placeholder_other_than_target_is_refused(project: Project) -> None:
    """``{tenant}`` for ``{target}``: nothing fills it in, so each run migrated one database
    literally called ``{tenant}`` (with TARGETS set, the fleet was refused for lacking a
    placeholder, without saying which word was wrong)."""
    project.write_env("shops", "DATABASE_URL=sqlite:///var/shops/{tenant}.sqlite3\n")

    error = project.fails("migrate", "--env=shops")

    assert (
        "shops: DATABASE_URL has {tenant}, which nothing fills in: the placeholder a fleet "
        "fills with each target's name is {target}"
    ) in error
    assert not (project.root / "var" / "shops").exists()
    project.write_env(
        "ports", "DATABASE_URL=postgresql+asyncpg://u:pw@h:{target}/s\nTARGETS=5432\n"
    )
    port = project.fails("status", "--env=ports")  # one server per shop, told apart by port
    assert port.endswith(
        "not a valid database URL (expected e.g. postgresql+asyncpg://user@host:5432/name or "
        "sqlite:///var/dev.sqlite3): {target} fills in a database, schema or host name, never "
        "a port\n"
    )


def test_a_negative_jobs_count_is_a_usage_error(fleet: Project) -> None:
    error = fleet.fails("migrate", "--env=shops", "--jobs=-2")
    assert "--jobs takes a whole number, 0 or more, not '-2'" in error
    assert "--canary takes a whole number" in fleet.fails("migrate", "--env=shops", "--canary=x")
    assert "--jobs takes a whole number" in fleet.fails("status", "--env=shops", "--jobs=two")
    assert not (fleet.root / "var" / "shops").exists()


def test_what_would_fail_every_target_alike_is_refused_once_before_any_starts(
    project: Project,
) -> None:
    project.write_env("shops", SQLITE_FLEET + "PROTECTED=true\n")
    project.ok("migrate", "--env=shops", "--yes")
    runs = len(list((project.root / "var" / "runs").glob("shops-*.json")))
    history = "see `invoke history --env=shops`"

    # refused before the protected fleet asks (without --yes it would refuse to go on)
    for task in (["migrate", "--to=nope"], ["rollback", "--to=nope"], ["stamp", "nope"]):
        error = project.fails(*task, "--env=shops")
        assert f"error: No such revision or branch 'nope'; {history}" in error
        assert "] failed" not in error and "--yes" not in error
    short = project.fails("rollback", f"--to={HEAD[:3]}", "--env=shops")  # a prefix too short
    assert f"error: '{HEAD[:3]}' is no revision id or branch label" in short
    assert "] failed" not in short and "--yes" not in short
    base = project.fails("stamp", "base", "--env=shops", "--yes")
    assert "error: stamp needs a revision, not base: roll back instead" in base
    project.add_revision("fork", revision("fork0001", HEAD))
    project.add_revision("other", revision("other001", HEAD))
    heads = project.fails("migrate", "--env=shops", "--yes")
    assert "error: the revisions have 2 heads (fork0001, other001): merge them" in heads
    assert "plan for 3 targets" not in heads
    project.add_revision("broken", "this is not python(\n")
    for task in (["rollback", "--yes"], ["status"], ["history"], ["check"]):  # each said once
        broken = project.invoke(*task, "--env=shops")  # as one database's, exit 2
        assert broken.returncode == 2, broken.stderr
        said = broken.stderr.splitlines()[-1]
        assert said.startswith("error: db/migrations/versions/broken.py, line 1, is not valid")
        assert "] failed" not in broken.stdout + broken.stderr
    (project.versions / "broken.py").unlink()

    assert len(list((project.root / "var" / "runs").glob("shops-*.json"))) == runs
    assert all(versions(project, shop) == [HEAD] for shop in SHOPS)
    project.ok("migrate", "--env=shops", "--yes", "--to=fork0001")
    assert all(versions(project, shop) == ["fork0001"] for shop in SHOPS)


def test_a_target_at_a_revision_no_file_has_is_told_as_on_one_database(fleet: Project) -> None:
    fleet.add_revision("second", revision("second01", HEAD))
    fleet.ok("migrate", "--env=shops", "--only=alpha")
    (fleet.versions / "second.py").unlink()  # the code of an older checkout

    status = fleet.invoke("status", "--env=shops", "--json")
    migrate = fleet.invoke("migrate", "--env=shops").stderr

    unknown = (
        "alpha: the shops.alpha database is at revision second01, which is not in "
        "db/migrations/versions: check out the code that matches this database"
    )
    assert status.returncode == 6 and unknown in status.stderr
    assert unknown in migrate and "No such revision" not in migrate
    [alpha] = [t for t in json.loads(status.stdout)["targets"] if t["target"] == "alpha"]
    assert alpha["current"] == ["second01"] and alpha["state"] == "failed"
    assert versions(fleet, "alpha") == ["second01"]
