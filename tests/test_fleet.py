"""Fleets: one environment, many databases, migrated in parallel by worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import pytest
from conftest import (
    Project,
    catalog_env,
    head_revision,
    pg_execute,
    pg_fetch,
    popen,
    revision,
    sqlite_catalog,
    tcp_server,
    wait_until,
)

HEAD = head_revision()
SHOPS = ("alpha", "beta", "gamma")
FLEET = "DATABASE_URL=sqlite:///var/shops/{target}.sqlite3\n"  # its targets named apart


@pytest.fixture
def fleet(project: Project) -> Project:
    project.write_env("shops", FLEET + "TARGETS=alpha, beta gamma\n")
    return project


def at(project: Project, shop: str) -> list[str]:
    path = project.root / "var" / "shops" / f"{shop}.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
        if "alembic_version" not in tables:
            return []
        return [row[0] for row in db.execute("select version_num from alembic_version")]


def test_every_target_is_migrated_and_status_reads_them_all(fleet: Project) -> None:
    result = fleet.ok("migrate", "--env=shops")

    assert "[shops] sqlite:///" in result.stderr and "{target}.sqlite3" in result.stderr
    assert result.stderr.count(f"migrated: {HEAD}") == 3
    assert "3 targets: 3 migrated (3 at " in result.stderr
    assert "\n  migrated    alpha, beta, gamma\n" in result.stderr  # the summary's row
    assert all(at(fleet, shop) == [HEAD] for shop in SHOPS)
    status = fleet.ok("status", "--env=shops", "--json")
    targets = json.loads(status.stdout)["targets"]
    assert [t["target"] for t in targets] == list(SHOPS)
    assert all(t["up_to_date"] and t["current"] == [HEAD] for t in targets)
    again = fleet.ok("migrate", "--env=shops").stderr
    assert again.count(f"already at {HEAD}") == 3


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        ("raise SystemExit(3)", "SystemExit: 3"),
        ("import asyncio\n    raise asyncio.CancelledError", "CancelledError"),
    ],
)
def test_a_revision_that_calls_sys_exit_fails_its_targets_not_the_run(
    fleet: Project, raised: str, said: str
) -> None:
    """SystemExit from a revision in a worker ended the whole run with its text alone: no
    summary, no report, and no word on where each target is; another BaseException than
    KeyboardInterrupt (asyncio's CancelledError) ended it with the parent's traceback."""
    fleet.ok("migrate", "--env=shops")
    body = f'op.create_table("coupons", sa.Column("id", sa.Integer))\n    {raised}'
    fleet.add_revision("exits", revision("exits1", HEAD, body, message="exits"))

    result = fleet.invoke("migrate", "--env=shops", "--keep-going")

    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr
    said = f"exits1 (exits) failed: {said}; the database is at {HEAD}; "
    assert result.stderr.count(said) == 4  # each target's line, and one row in the summary
    assert f"  failed      alpha, beta, gamma: upgrade of revision {said}" in result.stderr
    assert "3 targets: 3 failed" in result.stderr and "report: var/runs/shops-" in result.stderr
    assert [at(fleet, shop) for shop in SHOPS] == [[HEAD]] * 3


def test_debug_shows_each_failed_targets_traceback(fleet: Project) -> None:
    """--debug showed no traceback on a fleet: a target's failure, in a worker, reached the
    parent as its one-line message, so a data step's KeyError could not be traced to its line
    of the revision on the target it failed on."""
    fleet.ok("migrate", "--env=shops")
    body = 'if op.get_bind().engine.url.database.endswith("beta.sqlite3"):\n        {}["price"]'
    fleet.add_revision("key", revision("key001", HEAD, body, message="reprice"))

    plain = fleet.invoke("migrate", "--env=shops", "--keep-going")
    fleet.ok("rollback", "--env=shops", "--only=alpha,gamma")
    debug = fleet.invoke("migrate", "--env=shops", "--keep-going", "--debug")
    fleet.ok("rollback", "--env=shops", "--only=alpha,gamma")
    variable = fleet.invoke("migrate", "--env=shops", "--keep-going", INVOKE_DB_DEBUG="1")

    assert "Traceback" not in plain.stderr
    for run in (debug, variable):
        said = run.stderr
        assert said.count("Traceback (most recent call last)") == 2, said  # its cause's too
        assert '{}["price"]' in said and "KeyError: 'price'" in said  # the revision's line
        # the traceback, then the target's line, as on one database; the others' lines alone
        assert said.index("Traceback") < said.index("beta] failed: upgrade of revision key001")
        assert run.returncode == plain.returncode == 6
        assert run.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
    for kept in fleet.root.glob("var/runs/shops-*.json"):  # a traceback is stderr's alone
        assert all("trace" not in target for target in json.loads(kept.read_text())["targets"])
    assert [at(fleet, shop) for shop in SHOPS] == [["key001"], [HEAD], ["key001"]]


def test_a_target_file_the_app_keeps_locked_is_retried_last_and_migrated(fleet: Project) -> None:
    """A writer that keeps readers out made a target's file look corrupt; now the target
    comes back locked, and its last try (which waits) migrates it once the writer is done."""
    fleet.ok("migrate", "--env=shops", "--only=beta")
    fleet.ok("rollback", "--env=shops", "--only=beta")
    app = sqlite3.connect(fleet.root / "var" / "shops" / "beta.sqlite3", isolation_level=None)
    app.execute("begin exclusive")  # the app, committing a large write
    run = popen(fleet, "migrate", "--env=shops", "--jobs=1")
    try:
        others = (lambda: run.printed("gamma] migrated"), "the other targets")
        err = run.when(*others, lambda: app.execute("commit"), timeout=60)
    finally:
        app.close()

    assert run.returncode == 0, err
    assert "beta] locked by another connection (the app?): retried last" in err
    assert "corrupt" not in err
    assert all(at(fleet, shop) == [HEAD] for shop in SHOPS)


def test_a_signal_during_a_revisions_python_step_stops_every_running_target(
    fleet: Project,
) -> None:
    """Each target ran its Python step to the end and committed: the run exited 0, every
    target "migrated", although it had been asked to stop."""
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))\n    __import__("time").sleep(2)'
    fleet.add_revision("n", revision("notes1", HEAD, body))
    fleet.ok("migrate", "--env=shops", "--to=" + HEAD)
    run = popen(fleet, "migrate", "--env=shops", "--jobs=3")
    journals = [fleet.root / "var" / "shops" / f"{shop}.sqlite3-journal" for shop in SHOPS]
    wait_until(lambda: all(j.exists() for j in journals), "every target's step", process=run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)

    assert run.returncode == 130, err
    for shop in SHOPS:
        said = f"{shop}] failed: interrupted: the database is at {HEAD}; notes1 was rolled back"
        assert said in err
        assert at(fleet, shop) == [HEAD]


@pytest.mark.parametrize(
    ("task", "protected", "said"),
    [
        (["status"], False, "  failed      far: interrupted (SIGINT)\n"),
        (["check"], False, "  failed      far: interrupted (SIGINT)\n"),
        (["seed"], False, "  failed      far: interrupted (SIGINT)\n"),
        (["stamp", HEAD], False, "far: interrupted before stamping: nothing was recorded\n"),
        (["migrate"], False, "  failed      far: interrupted: no revision was run\n"),
        (["migrate", "--yes"], True, "\ninterrupted (SIGINT)\n"),  # reading for the plan
    ],
)
def test_a_signal_ends_a_fleet_task_waiting_on_a_server_that_never_answers(
    project: Project, task: list[str], protected: bool, said: str
) -> None:
    """The workers ignore signals and are told of them: these tasks waited out the whole
    CONNECT_TIMEOUT of a server that did not answer, then exited 6 as if it had failed (or,
    reading a protected fleet's plan, 130). A migrate said to raise CONNECT_TIMEOUT."""
    peers: list[socket.socket] = []
    with tcp_server(None, peers) as port:
        url = f"postgresql+asyncpg://shop@127.0.0.1:{port}/shop_{{target}}"
        project.write_env(
            "shops",
            f"DATABASE_URL={url}\nTARGETS=far\nCONNECT_TIMEOUT=300\nPROTECTED={protected}\n",
        )
        run = popen(project, *task, "--env=shops")
        wait_until(lambda: peers, "the target's connection", process=run)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)  # not CONNECT_TIMEOUT's 300

    assert run.returncode == 130, err
    assert said in err
    assert "Traceback" not in err and "CONNECT_TIMEOUT" not in err


def test_only_selects_targets_by_glob(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops", "--only=a*,gam*")

    assert at(fleet, "alpha") == [HEAD] and at(fleet, "gamma") == [HEAD]
    assert not (fleet.root / "var" / "shops" / "beta.sqlite3").exists()
    assert "no target matches" in fleet.fails("status", "--env=shops", "--only=zz*")


def test_an_empty_only_canary_or_jobs_is_refused_not_read_as_the_default(fleet: Project) -> None:
    """``--only=$FAILED`` with FAILED unset must not roll back (or migrate) the whole fleet."""
    fleet.ok("migrate", "--env=shops")

    for empty in ("--only=", "--only=,", "--only= , "):
        result = fleet.invoke("rollback", "--env=shops", empty)
        assert result.returncode == 2, result.stderr
        assert "error: --only is empty: name targets or globs" in result.stderr
    assert [at(fleet, name) for name in SHOPS] == [[HEAD]] * len(SHOPS)
    assert "--only is empty" in fleet.fails("status", "--env=dev", "--only=")
    for empty in ("--canary=", "--jobs="):  # not "no canary", nor the default
        result = fleet.invoke("rollback" if empty == "--jobs=" else "migrate", "--env=shops", empty)
        assert result.returncode == 2, result.stderr
        assert f"error: {empty[:-1]} takes a whole number, 0 or more, not ''" in result.stderr
    assert [at(fleet, name) for name in SHOPS] == [[HEAD]] * len(SHOPS)


def break_beta(project: Project) -> None:
    (project.root / "var" / "shops").mkdir(parents=True)
    with closing(sqlite3.connect(project.root / "var" / "shops" / "beta.sqlite3")) as db:
        db.execute("create table purchases (id integer)")  # the revision's last table conflicts


def beta_tables(project: Project) -> set[str]:
    with closing(sqlite3.connect(project.root / "var" / "shops" / "beta.sqlite3")) as db:
        return {row[0] for row in db.execute("select name from sqlite_master where type='table'")}


def test_a_failed_target_stops_new_ones_and_is_named(fleet: Project) -> None:
    break_beta(fleet)

    result = fleet.invoke("migrate", "--env=shops", "--jobs=1")

    assert result.returncode == 6, result.stderr
    assert "[2/3 beta] failed: upgrade of revision" in result.stderr
    assert "  failed      beta: upgrade of revision" in result.stderr
    assert at(fleet, "alpha") == [HEAD] and at(fleet, "beta") == []
    assert beta_tables(fleet) == {"purchases"}  # the three tables before it were rolled back
    assert not (fleet.root / "var" / "shops" / "gamma.sqlite3").exists()  # skipped
    assert "1 skipped" in result.stderr and "Traceback" not in result.stderr
    last = "error: 1 failed, 1 skipped of 3 targets; rerun to retry them (targets already there"
    assert result.stderr.splitlines()[-1].startswith(last)


def test_the_report_says_where_a_failed_target_is_and_not_a_skipped_one(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")
    body = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    fleet.add_revision("late", revision("late01", HEAD, body))
    with closing(sqlite3.connect(fleet.root / "var" / "shops" / "beta.sqlite3")) as db:
        db.execute("create table notes (id integer)")  # beta cannot take late01

    result = fleet.invoke("migrate", "--env=shops", "--jobs=1", "--json")

    assert result.returncode == 6, result.stderr
    alpha, beta, gamma = json.loads(result.stdout)["targets"]
    assert alpha["current"] == ["late01"] == at(fleet, "alpha")
    assert beta["state"] == "failed" and beta["current"] == [HEAD] == at(fleet, "beta")
    assert gamma["state"] == "skipped" and gamma["current"] is None  # never read: not known
    assert f"3 targets: 1 migrated, 1 failed, 1 skipped (1 at late01, 1 at {HEAD})" in (
        result.stderr
    )


def test_a_target_refused_where_it_stands_is_counted_there(fleet: Project) -> None:
    """A target that a guard refused (past --to, or before it on a rollback) was left out of
    the summary's versions and had "current": null in the report, though it had been read."""
    fleet.add_revision("late", revision("late01", HEAD))
    fleet.ok("migrate", "--env=shops", "--only=alpha")
    fleet.ok("migrate", "--env=shops", "--only=beta", f"--to={HEAD}")

    forward = fleet.invoke("migrate", "--env=shops", "--only=alpha,beta", f"--to={HEAD}", "--json")

    assert forward.returncode == 6
    assert f"1 failed, 1 up to date (1 at late01, 1 at {HEAD})" in forward.stderr
    alpha = json.loads(forward.stdout)["targets"][0]
    assert alpha["state"] == "failed" and alpha["current"] == ["late01"] == at(fleet, "alpha")

    back = fleet.invoke("rollback", "--env=shops", f"--to={HEAD}", "--keep-going", "--json")

    assert back.returncode == 6
    assert f"(2 at {HEAD}, 1 at base)" in back.stderr
    gamma = json.loads(back.stdout)["targets"][2]
    assert gamma["state"] == "failed" and gamma["current"] == [] == at(fleet, "gamma")


def test_after_a_failure_running_targets_finish_their_revision_and_stop(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")
    nap = "__import__('time').sleep(2)"
    # alpha fails after 1 s, while beta is one second into this revision's two
    beta_later = "__import__('time').sleep(2 if 'beta' in str(op.get_bind().engine.url) else 1)"
    notes = 'op.create_table("notes", sa.Column("id", sa.Integer))'
    fleet.add_revision("s1", revision("slow01", HEAD, f"{beta_later}\n    {notes}"))
    fleet.add_revision("s2", revision("slow02", "slow01", nap))
    fleet.add_revision("s3", revision("slow03", "slow02", nap))
    with closing(sqlite3.connect(fleet.root / "var" / "shops" / "alpha.sqlite3")) as db:
        db.execute("create table notes (id integer)")  # alpha cannot take slow01

    result = fleet.invoke("migrate", "--env=shops", "--jobs=2")

    assert result.returncode == 6, result.stderr
    assert at(fleet, "alpha") == [HEAD] and at(fleet, "gamma") == [HEAD]  # gamma not started
    assert at(fleet, "beta") == ["slow01"], result.stderr  # its running revision finished
    stopped = "  stopped     beta: another target failed, so it stopped before its next revision"
    assert f"{stopped}: the database is at slow01; slow01 was committed" in result.stderr
    assert "3 targets: 1 failed, 1 stopped, 1 skipped" in result.stderr


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (a fleet run's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        with suppress(OSError):  # gone meanwhile
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and stat.rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry.name))
    return found


def test_a_killed_worker_is_reported_with_where_its_targets_are(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")
    started = "__import__('pathlib').Path(op.get_bind().engine.url.database + '.started').touch()"
    fleet.add_revision("s", revision("slow01", HEAD, f"{started}\n    __import__('time').sleep(2)"))
    run = popen(fleet, "migrate", "--env=shops", "--jobs=2", "--keep-going")
    shops = fleet.root / "var" / "shops"
    try:
        wait_until(lambda: len(list(shops.glob("*.started"))) == 2, "two under way", process=run)
        os.kill(children(run.pid)[0], signal.SIGKILL)  # as the out-of-memory killer would
        _, err = run.communicate(timeout=60)
    finally:  # a run that hangs is killed, with its workers, not left to the next test
        for pid in [*children(run.pid), run.pid] if run.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        run.communicate()

    assert run.returncode == 6, err
    assert "Traceback" not in err
    for shop in ("alpha", "beta"):  # the two running: one rolled back, one stopped after it
        died = f"{shop}: a worker process died (killed?), so its run ended early"
        assert f"{died}; the database is at {at(fleet, shop)[0]}" in err
    assert at(fleet, "gamma") == ["slow01"]  # new workers took the rest


def test_a_signal_ends_the_read_back_of_a_killed_workers_target(project: Project) -> None:
    """After a worker died, its target's revision is read back from the parent: that read,
    of a server that did not answer, ignored SIGINT and ran out CONNECT_TIMEOUT."""
    peers: list[socket.socket] = []
    with tcp_server(None, peers) as port:
        url = f"postgresql+asyncpg://shop@127.0.0.1:{port}/shop_{{target}}"
        project.write_env("shops", f"DATABASE_URL={url}\nTARGETS=far\nCONNECT_TIMEOUT=300\n")
        run = popen(project, "migrate", "--env=shops")
        try:
            wait_until(lambda: peers, "the worker's connection", process=run)
            os.kill(children(run.pid)[0], signal.SIGKILL)
            wait_until(lambda: len(peers) == 2, "the parent's read back", process=run)
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=60)  # not CONNECT_TIMEOUT's 300
        finally:
            for pid in [*children(run.pid), run.pid] if run.poll() is None else []:
                os.kill(pid, signal.SIGKILL)
            run.communicate()

    assert run.returncode == 6, err  # a worker died: a failure, not only an interruption
    assert "Traceback" not in err
    died = "far: a worker process died (killed?), so its run ended early"
    assert f"{died}; its revision could not be read back (interrupted (SIGINT))" in err


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie left for its new parent to reap does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_do_not_outlive_a_parent_killed_without_a_word(fleet: Project) -> None:
    fleet.ok("migrate", "--env=shops")
    started = "__import__('pathlib').Path(op.get_bind().engine.url.database + '.started').touch()"
    fleet.add_revision("s", revision("slow01", HEAD, f"{started}\n    __import__('time').sleep(2)"))
    run = popen(fleet, "migrate", "--env=shops", "--jobs=2")
    shops = fleet.root / "var" / "shops"
    workers: list[int] = []
    try:
        wait_until(lambda: len(list(shops.glob("*.started"))) == 2, "two under way", process=run)
        workers = children(run.pid)
        os.kill(run.pid, signal.SIGKILL)  # as a CI job's time limit or the OOM killer would
        run.communicate(timeout=60)
        wait_until(lambda: not any(map(alive, workers)), "the orphaned workers to exit")
    finally:  # whatever is left is killed, not left to the next test
        for pid in filter(alive, [*workers, run.pid]):
            os.kill(pid, signal.SIGKILL)

    for shop in SHOPS:  # each at a revision of its own, as far as its worker got
        assert at(fleet, shop) in ([HEAD], ["slow01"])


def test_keep_going_migrates_the_rest_and_a_rerun_only_the_fixed(fleet: Project) -> None:
    break_beta(fleet)

    result = fleet.invoke("migrate", "--env=shops", "--jobs=1", "--keep-going")

    assert result.returncode == 6, result.stderr
    assert at(fleet, "alpha") == [HEAD] == at(fleet, "gamma") and at(fleet, "beta") == []
    assert beta_tables(fleet) == {"purchases"}
    with closing(sqlite3.connect(fleet.root / "var" / "shops" / "beta.sqlite3")) as db:
        db.execute("drop table purchases")
    rerun = fleet.ok("migrate", "--env=shops").stderr
    assert rerun.count("already at") == 2 and "[" in rerun and f"beta] migrated: {HEAD}" in rerun
    past = fleet.invoke("migrate", "--env=shops", "--to=base")
    assert past.returncode == 6 and "3 targets: 3 failed" in past.stderr
    alike = f"  failed      alpha, beta, gamma: the shops.{{target}} database is at {HEAD}, past"
    assert alike in past.stderr  # one row for the three, as of the fleet
    assert f"gamma] failed: the shops.gamma database is at {HEAD}, past base" in past.stderr


@pytest.fixture
def pg_fleet(project: Project, pg_server: str) -> Iterator[tuple[Project, str]]:
    prefix = f"fleet_{uuid.uuid4().hex[:8]}"
    for shop in SHOPS:
        pg_execute(pg_server, f'CREATE DATABASE "{prefix}_{shop}"')
    base = pg_server.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{prefix}_{{target}}"
    project.write_env("shops", f"DATABASE_URL={url}\nTARGETS={','.join(SHOPS)}\n")
    yield project, f"{base}/{prefix}"
    for shop in SHOPS:
        pg_execute(pg_server, f'DROP DATABASE IF EXISTS "{prefix}_{shop}" WITH (FORCE)')


@pytest.mark.postgres
def test_two_runs_at_once_migrate_each_postgres_target_exactly_once(
    pg_fleet: tuple[Project, str],
) -> None:
    project, dsn_prefix = pg_fleet

    runs = [popen(project, "migrate", "--env=shops") for _ in range(2)]
    results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]

    assert [code for code, _ in results] == [0, 0], results
    for shop in SHOPS:
        rows = pg_fetch(f"{dsn_prefix}_{shop}", "select revision, direction from migration_log")
        assert [(r["revision"], r["direction"]) for r in rows] == [(HEAD, "up")]


def test_targets_can_come_from_a_file(project: Project) -> None:
    (project.root / "shops.txt").write_text("# one shop a line\nalpha\n\ngamma  # comment\n")
    url = "sqlite:///var/shops/{target}.sqlite3"
    project.write_env("shops", f"DATABASE_URL={url}\nTARGETS_FILE=shops.txt\n")

    result = project.ok("migrate", "--env=shops")

    assert "2 targets: 2 migrated" in result.stderr
    assert at(project, "alpha") == [HEAD] == at(project, "gamma")


def test_two_targets_whose_urls_were_swapped_are_refused(project: Project) -> None:
    """The env-name guard, per target: a catalog that swapped two shops' URLs would run
    each shop's migrations (a data migration for that shop, say) on the other's data."""
    urls = {name: f"sqlite:///var/shops/{name}.sqlite3" for name in ("alpha", "beta")}
    listing = project.root / "shops.txt"
    listing.write_text(f"alpha {urls['alpha']}\nbeta {urls['beta']}\n")
    project.write_env("shops", "DATABASE_URL=sqlite:///unused.sqlite3\nTARGETS_FILE=shops.txt\n")
    project.ok("migrate", "--env=shops")
    project.add_revision("next", revision("next01", HEAD, "pass", message="next"))
    listing.write_text(f"alpha {urls['beta']}\nbeta {urls['alpha']}\n")

    result = project.invoke("migrate", "--env=shops", "--keep-going")

    assert result.returncode == 4, result.stderr
    for was, now in (("alpha", "beta"), ("beta", "alpha")):
        assert (
            f"this database was last migrated as shops.{was}, not shops.{now}: check that the "
            "target's URL (TARGETS_FILE, the catalog) names its own database, or pass "
            "--allow-env-mismatch if it really is this target's"
        ) in result.stderr
    assert at(project, "alpha") == [HEAD] == at(project, "beta")
    project.ok("migrate", "--env=shops", "--only=alpha", "--allow-env-mismatch")
    assert at(project, "beta") == ["next01"]  # alpha's name now, on beta's file
    assert "--allow-env-mismatch" in project.fails("migrate", "--env=shops", "--only=beta")


def test_a_failed_canary_keeps_the_rest_untouched(fleet: Project) -> None:
    (fleet.root / "var" / "shops").mkdir(parents=True)
    with closing(sqlite3.connect(fleet.root / "var" / "shops" / "alpha.sqlite3")) as db:
        db.execute("create table categories (id integer)")

    result = fleet.invoke("migrate", "--env=shops", "--canary=1", "--keep-going")

    assert result.returncode == 6, result.stderr
    assert "2 skipped" in result.stderr
    assert not (fleet.root / "var" / "shops" / "beta.sqlite3").exists()
    ok = fleet.ok("migrate", "--env=shops", "--canary=1", "--only=beta,gamma")
    assert "2 migrated" in ok.stderr


def test_canaries_are_targets_with_revisions_to_apply(fleet: Project) -> None:
    """alpha is already at head (an earlier run, --only): as the canary it proved nothing,
    and beta and gamma then ran together, unguarded. The canary is beta, the first target
    behind; it fails, so gamma is left untouched and alpha is reported as it is."""
    fleet.ok("migrate", "--env=shops", "--only=alpha")
    with closing(sqlite3.connect(fleet.root / "var" / "shops" / "beta.sqlite3")) as db:
        db.execute("create table categories (id integer)")

    result = fleet.invoke("migrate", "--env=shops", "--canary=1")

    assert result.returncode == 6, result.stderr
    assert "[1/3 beta] failed: upgrade of revision" in result.stderr
    assert "gamma] skipped (a canary failed)" in result.stderr
    assert "alpha] already at" in result.stderr
    assert "3 targets: 1 up to date, 1 failed, 1 skipped" in result.stderr
    assert not (fleet.root / "var" / "shops" / "gamma.sqlite3").exists()
    (fleet.root / "var" / "shops" / "beta.sqlite3").unlink()
    again = fleet.ok("migrate", "--env=shops", "--canary=1")
    assert "[1/3 beta] migrated" in again.stderr, again.stderr  # the canary, before gamma
    assert at(fleet, "gamma") == [HEAD]


def test_a_signal_during_the_canary_says_the_rest_were_interrupted(fleet: Project) -> None:
    """SIGINT while the canary ran: the rest were reported "skipped (a canary failed)",
    which no canary had."""
    started = "__import__('pathlib').Path(op.get_bind().engine.url.database + '.started').touch()"
    fleet.add_revision("s", revision("slow01", HEAD, f"{started}\n    __import__('time').sleep(2)"))
    run = popen(fleet, "migrate", "--env=shops", "--canary=1")
    shops = fleet.root / "var" / "shops"
    wait_until(lambda: list(shops.glob("*.started")), "the canary under way", process=run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)

    assert run.returncode == 130, err
    assert [p.name for p in shops.glob("*.started")] == ["alpha.sqlite3.started"]
    assert "alpha] failed: interrupted: the database is at " in err
    assert "beta] skipped (interrupted)" in err and "gamma] skipped (interrupted)" in err
    assert "canary failed" not in err


def test_targets_can_come_from_a_catalog_query(project: Project) -> None:
    sqlite_catalog(project, "slug text, active int", ("alpha", 1), ("beta", 0), ("gamma", 1))
    query = "select slug from shops where active = 1 order by slug"
    project.write_env("shops", catalog_env(FLEET, query))

    result = project.ok("migrate", "--env=shops")

    assert "2 targets: 2 migrated" in result.stderr
    assert at(project, "alpha") == [HEAD] == at(project, "gamma")
    project.write_env("shops", catalog_env(FLEET, "select slug from nowhere"))
    missing = project.fails("status", "--env=shops")
    assert (
        "TARGETS_QUERY failed: no such table: nowhere; fix it in environments/shops.env" in missing
    )


def test_a_catalog_row_without_a_name_or_a_query_without_rows_is_refused(
    project: Project,
) -> None:
    sqlite_catalog(project, "id int, slug text", (0, "alpha"), (1, None), (2, "gamma"))
    project.write_env("shops", catalog_env(FLEET, "select slug from shops order by id"))

    unnamed = project.fails("status", "--env=shops")

    assert "error: shops: row 2 of TARGETS_QUERY has no name" in unnamed
    assert "Traceback" not in unnamed
    project.write_env("shops", catalog_env(FLEET, "select id from shops order by id"))
    numbered = project.ok("status", "--env=shops")  # 0 is a name, not a missing one
    assert "behind      0, 1, 2" in numbered.stderr
    project.write_env("shops", catalog_env(FLEET, "update shops set slug = 'x'"))
    writing = project.fails("status", "--env=shops")
    assert "error: shops: TARGETS_QUERY returns no rows: it must be a query" in writing
    assert "Traceback" not in writing
    with closing(sqlite3.connect(project.root / "var" / "catalog.sqlite3")) as db:
        assert db.execute("select count(*) from shops where slug = 'x'").fetchone() == (0,)


def test_a_catalogs_url_and_the_urls_it_gives_are_checked_as_theirs(project: Project) -> None:
    sqlite_catalog(project, "slug text, dsn text", ("alpha", "not a url"))

    unset = "sqlite:///var/${CATALOG}.sqlite3"
    project.write_env("shops", catalog_env(FLEET, "select slug from shops", unset))
    error = project.fails("status", "--env=shops")
    assert "environments/shops.env: TARGETS_DATABASE_URL uses ${CATALOG}, which is not set" in error
    gone = catalog_env(FLEET, "select slug from shops", "sqlite:///var/gone.sqlite3")
    project.write_env("shops", gone)  # not "TARGETS_QUERY failed: no such table"
    assert (
        "error: shops: the catalog var/gone.sqlite3 (TARGETS_DATABASE_URL) does not exist: "
        "point TARGETS_DATABASE_URL in environments/shops.env at the database that lists"
    ) in project.fails("status", "--env=shops")
    assert not (project.root / "var" / "gone.sqlite3").exists()
    project.write_env("shops", catalog_env(FLEET, "select slug, dsn from shops"))
    bad = project.fails("status", "--env=shops")
    assert "error: shops: the URL TARGETS_QUERY gives target alpha is not a valid" in bad
    assert "DATABASE_URL is" not in bad
    project.write_env("shops", FLEET + "TARGETS_FILE=shops.txt\n")
    (project.root / "shops.txt").write_text("alpha mysql://shop@db/alpha\n")
    driver = project.fails("status", "--env=shops")
    assert "unsupported driver 'mysql' in the URL TARGETS_FILE gives target alpha" in driver


@pytest.mark.postgres
def test_max_connections_per_host_caps_the_targets_running_at_once(
    pg_fleet: tuple[Project, str], pg_server: str
) -> None:
    project, dsn_prefix = pg_fleet
    env = (project.root / "environments" / "shops.env").read_text()
    project.write_env("shops", env + "MAX_CONNECTIONS_PER_HOST=1\n")
    body = 'op.execute("select pg_sleep(0.7)")'
    project.add_revision("slow", revision("slow01", HEAD, body))
    prefix = dsn_prefix.rsplit("/", 1)[1]
    sessions = (
        "select count(*) as n from pg_stat_activity where application_name = 'migrations' "
        f"and datname like '{prefix}%'"
    )

    run = popen(project, "migrate", "--env=shops", "--jobs=3")
    most = 0
    while run.poll() is None:
        most = max(most, pg_fetch(pg_server, sessions)[0]["n"])
    _, err = run.communicate()

    assert run.returncode == 0, err
    assert most == 1
    assert err.count("migrated: ") == 3
