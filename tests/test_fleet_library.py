"""The fleet library in-process: where targets come from, what each target's environment
is, and how a run's outcomes become one exit code."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from conftest import Project

from db import fleet, fleet_runs
from db.environments import Environment, load_environment
from db.errors import ConfigError
from db.fleet import Target
from db.fleet_runs import Outcome, Plan


def shops(project: Project, text: str) -> Environment:
    project.write_env("shops", text)
    return load_environment(project.root, "shops", {"SHOPS_PASSWORD": "s3cret"})


def test_targets_take_commas_or_whitespace_and_only_takes_globs(project: Project) -> None:
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha, beta\tgamma,,\n")

    assert [t.name for t in fleet.targets(env)] == ["alpha", "beta", "gamma"]
    assert [t.name for t in fleet.targets(env, "g*, al*")] == ["alpha", "gamma"]
    with pytest.raises(ConfigError, match=r"no target matches --only=zz\*"):
        fleet.targets(env, "zz*")


def test_a_name_in_only_that_no_target_has_is_refused_not_left_out(project: Project) -> None:
    """``--only=alpha,gama`` (a typo) migrated alpha alone and exited 0: gamma was left out
    without a word. A glob may match nothing; a name must be a target's."""
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha beta gamma\n")

    with pytest.raises(
        ConfigError,
        match=r"^shops has no target named gama \(its targets: alpha, beta, gamma\): --only ",
    ):
        fleet.targets(env, "alpha,gama")
    assert [t.name for t in fleet.targets(env, "alpha,zz*")] == ["alpha"]


@pytest.mark.parametrize("name", ["..", ".hidden", "-rf", "a/b", "shop$", "магазин"])
def test_a_target_name_that_is_no_plain_name_is_refused(project: Project, name: str) -> None:
    """A catalog's slug goes into a path or a database name: ``..`` would leave the folder
    (``sqlite:///var/shops/{target}/db.sqlite3``)."""
    (project.root / "shops.txt").write_text(f"alpha\n{name}\n")
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}/db.sqlite3\nTARGETS_FILE=shops.txt\n")
    with pytest.raises(
        ConfigError, match="must start with an ASCII letter, a digit or _, and hold ASCII"
    ):
        fleet.targets(env)


def test_a_target_name_longer_than_the_audit_trail_keeps_is_refused(project: Project) -> None:
    """Each audit row names its target in 64 characters: on PostgreSQL a longer name (a
    catalog's target with a URL of its own) failed every revision's insert, as if the
    revision were broken."""
    (project.root / "shops.txt").write_text(f"{'a' * 64}\n{'b' * 65}\n")
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_FILE=shops.txt\n")
    with pytest.raises(ConfigError, match="target b{20}... is 65 characters long, and the audit"):
        fleet.targets(env)
    (project.root / "shops.txt").write_text(f"{'a' * 64}\n")
    assert [t.name for t in fleet.targets(env)] == ["a" * 64]


def test_a_target_that_makes_a_database_name_postgresql_would_cut_is_refused(
    project: Project,
) -> None:
    """PostgreSQL cuts a name to 63 bytes: two long shops would share one database."""
    long = "x" * 60
    env = shops(
        project, f"DATABASE_URL=postgresql+asyncpg://s@h/shop_{{target}}\nTARGETS=ok {long}\n"
    )
    with pytest.raises(ConfigError, match=f"target '{long}' makes the database name 'shop_{long}'"):
        fleet.targets(env, "ok")  # the whole fleet is refused, not only the long one
    assert [
        t.name
        for t in fleet.targets(
            shops(project, f"DATABASE_URL=sqlite:///var/{{target}}.db\nTARGETS={long}\n")
        )
    ] == [long]  # a file


def test_two_targets_that_are_one_database_are_refused(project: Project) -> None:
    """A MIGRATION_URL without {target} (copied from a one-database env file) migrated one
    database as every target, and reported the others as up to date."""
    pooled = shops(
        project,
        "DATABASE_URL=sqlite:///var/{target}.db\nMIGRATION_URL=sqlite:///var/one.db\n"
        "TARGETS=alpha beta\n",
    )
    with pytest.raises(ConfigError) as one:
        fleet.targets(pooled, "alpha")  # the whole fleet is refused, whichever is chosen
    assert str(one.value) == (
        f"shops: targets alpha and beta are one database (sqlite:///{project.root}/var/one.db): "
        "put {target} in MIGRATION_URL too"
    )
    (project.root / "shops.txt").write_text(
        "alpha postgresql+asyncpg://shop@db/shop\nbeta postgresql+asyncpg://shop:pw@db/shop\n"
    )
    listed = shops(
        project, "DATABASE_URL=postgresql+asyncpg://s@h/{target}\nTARGETS_FILE=shops.txt\n"
    )
    with pytest.raises(ConfigError, match="give each target its own URL") as same:
        fleet.targets(listed)
    assert "pw" not in str(same.value)  # the URL is masked


def test_targets_from_two_sources_are_refused(project: Project) -> None:
    """A TARGETS left in while TARGETS_QUERY was added: which wins would be a guess."""
    (project.root / "shops.txt").write_text("alpha\n")
    env = shops(
        project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=beta\nTARGETS_FILE=shops.txt\n"
    )
    with pytest.raises(ConfigError, match="shops: TARGETS and TARGETS_FILE are both set"):
        fleet.targets(env)


@pytest.mark.parametrize(
    "lines",
    [
        "DATABASE_URL=sqlite:///var/one.db\n",  # one database migrated, and the fleet not
        "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=beta\n",
    ],
)
def test_a_catalog_with_no_query_is_refused_not_ignored(project: Project, lines: str) -> None:
    env = shops(project, f"{lines}TARGETS_DATABASE_URL=sqlite:///var/catalog.db\n")
    with pytest.raises(ConfigError, match="TARGETS_DATABASE_URL is set, but no TARGETS_QUERY"):
        fleet.is_fleet(env)


def test_a_catalog_query_with_no_catalog_is_refused(project: Project) -> None:
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_QUERY=select 'a'\n")
    with pytest.raises(ConfigError, match="shops: TARGETS_QUERY needs TARGETS_DATABASE_URL"):
        fleet.targets(env)


def test_a_target_named_twice_is_refused(project: Project) -> None:
    """A run reports on each target by its name: one named twice would be migrated by two
    workers at once and reported twice with one outcome."""
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha beta alpha\n")
    with pytest.raises(ConfigError, match="TARGETS names alpha more than once"):
        fleet.targets(env)

    (project.root / "shops.txt").write_text("beta\nbeta sqlite:///var/other.db\n")
    listed = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_FILE=shops.txt\n")
    with pytest.raises(ConfigError, match="TARGETS_FILE names beta more than once"):
        fleet.targets(listed)


def test_a_targets_file_that_is_not_names_and_urls_is_refused_by_line(project: Project) -> None:
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_FILE=shops.txt\n")
    (project.root / "shops.txt").write_text("alpha\nnew shop sqlite:///var/new.db\n")
    with pytest.raises(ConfigError, match="shops.txt, line 2: 3 words; a line holds a target's"):
        fleet.targets(env)

    (project.root / "shops.txt").write_bytes(b"alpha\nb\xe9ta\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match="cannot read TARGETS_FILE shops.txt: not UTF-8 text"):
        fleet.targets(env)

    (project.root / "shops.txt").unlink()  # what is wrong, and what to do about it
    missing = "cannot read TARGETS_FILE shops.txt: No such file or directory; point TARGETS_FILE"
    with pytest.raises(ConfigError, match=missing):
        fleet.targets(env)


def test_a_targets_file_saved_on_windows_reads_as_the_same_names(project: Project) -> None:
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_FILE=shops.txt\n")
    (project.root / "shops.txt").write_bytes(b"\xef\xbb\xbfalpha\r\nbeta  # new\r\n")  # BOM, CRLF

    assert [t.name for t in fleet.targets(env)] == ["alpha", "beta"]


def test_a_targets_file_from_home_is_read_there(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(project.root / "home"))
    (project.root / "home").mkdir()
    (project.root / "home" / "shops.txt").write_text("alpha\nbeta\n")
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS_FILE=~/shops.txt\n")

    assert [t.name for t in fleet.targets(env)] == ["alpha", "beta"]


def test_a_targets_file_line_may_give_the_targets_own_url(project: Project) -> None:
    (project.root / "shops.txt").write_text(
        "# name [url]\nnear\nfar postgresql+asyncpg://shop@10.0.0.7/shop_far  # other server\n"
    )
    env = shops(
        project,
        "DATABASE_URL=postgresql+asyncpg://shop@127.0.0.1/shop_{target}\n"
        "MIGRATION_URL=postgresql+asyncpg://shop@127.0.0.1:5433/shop_{target}\n"
        "DATABASE_PASSWORD=${SHOPS_PASSWORD}\nTARGETS_FILE=shops.txt\n",
    )

    near, far = fleet.targets(env)
    assert far == Target("far", "postgresql+asyncpg://shop@10.0.0.7/shop_far")
    near_env, far_env = fleet.environment(env, near), fleet.environment(env, far)
    assert near_env.url().database == "shop_near" and near_env.url().port == 5433
    assert far_env.url().host == "10.0.0.7" and far_env.url().port is None  # no MIGRATION_URL
    assert far_env.url().password == "s3cret"  # DATABASE_PASSWORD applies to its URL too
    assert (near_env.label, far_env.target) == ("shops.near", "far")
    assert fleet.host(near_env) != fleet.host(far_env)


def test_the_server_of_a_target_without_a_host_in_its_url(project: Project) -> None:
    """A socket's folder, or several hosts, in the query: a server of its own for the
    per-host cap, not a SQLite fleet's "local files" that every such target shared."""
    servers = {}
    given = {"a": "@/?host=/run/a", "b": "@/?host=/run/b", "c": "@/?host=h1&host=h2"}
    given["d"] = "@:5433/?host=/run/a"  # another server's socket, in the same folder
    for name, where in given.items():
        url = f"postgresql+asyncpg://s{where.replace('/?', '/shop_{target}?')}"
        env = shops(project, f"DATABASE_URL={url}\nTARGETS=x\n")
        servers[name] = fleet.host(fleet.environment(env, fleet.targets(env)[0]))
    assert servers == {"a": "/run/a", "b": "/run/b", "c": "h1,h2", "d": "/run/a:5433"}
    socket = shops(project, "DATABASE_URL=postgresql+asyncpg://s@/shop_{target}\nTARGETS=x\n")
    assert fleet.host(fleet.environment(socket, fleet.targets(socket)[0])) == "the local socket"


def test_schema_per_target_and_what_a_fleet_must_name(project: Project) -> None:
    env = shops(
        project, "DATABASE_URL=postgresql+asyncpg://s@h/shops\nSCHEMA={target}\nTARGETS=a1 b2\n"
    )
    assert [fleet.environment(env, t).schema for t in fleet.targets(env)] == ["a1", "b2"]

    bad = shops(project, "DATABASE_URL=postgresql+asyncpg://s@h/shops\nTARGETS=a b\n")
    with pytest.raises(ConfigError, match=r"needs \{target\} in DATABASE_URL or in SCHEMA"):
        fleet.targets(bad)
    odd = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=a/b\n")
    with pytest.raises(ConfigError, match="hold ASCII letters, digits, . _ - only"):
        fleet.targets(odd)
    dashed = shops(
        project, "DATABASE_URL=postgresql+asyncpg://s@h/x\nSCHEMA={target}\nTARGETS=ok a-b\n"
    )
    with pytest.raises(ConfigError, match=r"target 'a-b' makes SCHEMA 'a-b', which must start"):
        fleet.targets(dashed, "ok")  # refused for the whole fleet, before any target runs
    digit = shops(project, "DATABASE_URL=postgresql+asyncpg://s@h/x\nSCHEMA=9lives\n")
    with pytest.raises(
        ConfigError, match=r"SCHEMA must start with an ASCII letter or _, .*'9lives'"
    ):
        _ = digit.schema  # one database: said of the env file's own SCHEMA
    long = shops(project, f"DATABASE_URL=postgresql+asyncpg://s@h/x\nSCHEMA=t_{'x' * 62}\n")
    with pytest.raises(ConfigError, match="and be 63 at most"):  # PostgreSQL would cut it
        _ = long.schema
    unnamed = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=\n")
    with pytest.raises(ConfigError, match=r"DATABASE_URL has \{target\}, but no targets are named"):
        fleet.is_fleet(unnamed)
    upper = shops(project, "DATABASE_URL=postgresql+asyncpg://s@h/x\nSCHEMA={TARGET}\n")
    with pytest.raises(ConfigError, match=r"SCHEMA has \{TARGET\}, which nothing fills in"):
        fleet.is_fleet(upper)
    braced = "DATABASE_URL=postgresql+asyncpg://s:p{w}d@h/{target}\nTARGETS=a\n"
    assert fleet.is_fleet(shops(project, braced))  # a password's braces are no placeholder
    sqlite = shops(project, "DATABASE_URL=sqlite:///var/x.db\nSCHEMA={target}\nTARGETS=a\n")
    with pytest.raises(ConfigError, match="SQLite has no schemas"):
        fleet.environment(sqlite, fleet.targets(sqlite)[0]).url()


def test_shared_schemas_follow_a_targets_schema_on_the_search_path(project: Project) -> None:
    url = "DATABASE_URL=postgresql+asyncpg://s@h/shops\n"
    env = shops(project, f"{url}SCHEMA={{target}}\nTARGETS=a1\nSHARED_SCHEMAS=public, ext\n")
    assert fleet.environment(env, fleet.targets(env)[0]).search_path == ("a1", "public", "ext")
    assert shops(project, url).search_path == ()  # the server's own

    alone = shops(project, f"{url}SHARED_SCHEMAS=public\n")
    with pytest.raises(ConfigError, match="SHARED_SCHEMAS goes after SCHEMA on the search path"):
        _ = alone.search_path  # the server's path has public already
    odd = shops(project, f"{url}SCHEMA=a\nSHARED_SCHEMAS=public ext-1\n")
    with pytest.raises(ConfigError, match=r"each of SHARED_SCHEMAS must start .*'ext-1'"):
        _ = odd.search_path
    sqlite = shops(project, "DATABASE_URL=sqlite:///var/x.db\nSHARED_SCHEMAS=public\n")
    with pytest.raises(ConfigError, match="SQLite has no schemas: remove SHARED_SCHEMAS"):
        sqlite.url()


def test_what_is_said_of_a_target_is_written_as_of_the_fleet(project: Project) -> None:
    """How a protected fleet's plan says once what it says of many targets alike: the
    target's name whole, never the start of another's."""
    from cli.fleet import as_the_fleets

    url = "postgresql+asyncpg://shop:${SHOPS_PASSWORD}@db:5432/shop_{target}"
    env = shops(project, f"DATABASE_URL={url}\nTARGETS=al al2\n")
    said = (
        "cannot connect to postgresql+asyncpg://shop:***@db:5432/shop_al: refused; the "
        "shops.al database (not shops.al2) is at dead00000009: `invoke stamp --env=shops "
        "--only=al NEW`, not --only=al2 or --only=al.x"
    )

    assert as_the_fleets(env, Target("al"), said) == (
        "cannot connect to postgresql+asyncpg://shop:***@db:5432/shop_{target}: refused; the "
        "shops.{target} database (not shops.al2) is at dead00000009: `invoke stamp "
        "--env=shops --only={target} NEW`, not --only=al2 or --only=al.x"
    )
    own = Target("al", url="postgresql+asyncpg://shop@elsewhere:5432/shop_al")
    assert "elsewhere" in as_the_fleets(env, own, said.replace("db:5432", "elsewhere:5432"))


def test_one_target_for_the_one_database_tasks(project: Project) -> None:
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha beta\n")

    assert fleet.one(env, "be*").target == "beta"
    with pytest.raises(ConfigError, match="--only=NAME"):
        fleet.one(env, "")
    with pytest.raises(ConfigError) as several:
        fleet.one(env, "*")
    assert str(several.value) == (
        "--only=* matches 2 targets of shops (alpha, beta); this task works on one target at "
        "a time: name one"
    )


@pytest.mark.parametrize(
    ("codes", "states", "expected"),
    [
        ((), ("migrated", "up to date"), 0),
        ((3, 3), ("failed", "failed"), 3),  # every failure a lock wait that ran out
        ((4,), ("failed", "skipped"), 4),  # a guard refused; the rest never started
        ((143,), ("failed", "skipped"), 143),  # interrupted
        ((1, 3), ("failed", "failed"), 6),
        ((1,), ("failed", "migrated"), 6),
    ],
)
def test_a_fleet_runs_exit_code(
    codes: tuple[int, ...], states: tuple[str, ...], expected: int
) -> None:
    outcomes = [
        Outcome(f"t{i}", state, exit_code=codes[i] if i < len(codes) and state == "failed" else 0)
        for i, state in enumerate(states)
    ]
    assert fleet_runs.exit_code(outcomes) == expected


def test_a_fleet_run_stopped_by_a_signal_exits_with_its_code() -> None:
    """A signal before any target started skips them all: 130, not 6 as if targets failed."""
    skipped = [Outcome(name, "skipped", "interrupted") for name in ("alpha", "beta")]
    assert fleet_runs.exit_code(skipped, signal.SIGINT) == 130
    assert fleet_runs.exit_code([Outcome("alpha", "failed", exit_code=1), *skipped], 15) == 6
    assert fleet_runs.exit_code([Outcome("alpha", "migrated")], signal.SIGTERM) == 0  # all there


def test_default_jobs_grow_with_servers_and_never_pass_the_targets() -> None:
    assert fleet_runs.default_jobs(1, 1) == 1
    assert fleet_runs.default_jobs(500, 2) == 2 * fleet_runs.default_jobs(500, 1)


def test_a_run_forks_no_more_workers_than_targets_can_use(project: Project) -> None:
    """Each worker is a process forked up front: ``--jobs=2000`` on two targets forked 2000
    of them (a minute of forking); MAX_CONNECTIONS_PER_HOST caps one server's share too."""
    env = shops(project, "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha beta gamma\n")
    seen: list[int] = []

    def count(_target: Target) -> None:
        seen.append(len(multiprocessing.active_children()))

    outcomes = fleet_runs.run(
        env, os.environ, fleet.targets(env)[:2], Plan("status", jobs=50), None, count
    )
    assert [o.state for o in outcomes] == ["behind", "behind"] and max(seen) == 2
    capped = shops(
        project,
        "DATABASE_URL=sqlite:///var/{target}.db\nTARGETS=alpha beta gamma\n"
        "MAX_CONNECTIONS_PER_HOST=1\n",
    )
    seen.clear()
    fleet_runs.run(capped, os.environ, fleet.targets(capped), Plan("status", jobs=50), None, count)
    assert max(seen) == 1  # one server, one at a time: one worker
