"""Session parameters through the pool (issue 10 findings 1 and 2, issue 9 finding 3):
a client is told the server's canonical values, gets its own settings on whichever
server connection it lands, and never another client's."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from devservers import FaultRelay, PostgresCluster
from proxyhelpers import ProxyFactory, Role, wait_until

from proxy.pool import ACCEPTED_SETTINGS
from proxy.protocol import messages as m
from proxy.protocol import parameters
from proxy.protocol.errors import UnsupportedParameter
from proxy.protocol.parameters import PLAIN_SET, client_settings, settings_sql, split_options

MODES = ["transaction", "session"]


async def raw_login(port: int, params: dict[str, str]) -> tuple[dict[str, str], bytes]:
    """Log in with a bare startup packet; (ParameterStatus values, the ErrorResponse
    body if the login failed, else b"")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(m.startup_message(params))
        told: dict[str, str] = {}
        while True:
            head = await asyncio.wait_for(reader.readexactly(5), 30)
            body = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
            if head[:1] == b"S":
                name, value = body[:-1].split(b"\0")
                told[name.decode()] = value.decode()
            elif head[:1] == b"E":
                return told, body
            elif head[:1] == b"Z":
                writer.write(m.TERMINATE)
                return told, b""
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("mode", MODES)
async def test_parameter_status_carries_the_servers_spelling(
    make_proxy: ProxyFactory, role: Role, mode: str
) -> None:
    proxy = await make_proxy(pool_mode=mode, pool_size=1)
    base = {"user": "app", "database": role.database}
    for sent, canonical in (("utf-8", "UTF8"), ("euc-jp", "EUC_JP"), ("utf8", "UTF8")):
        told, error = await raw_login(
            proxy.port,
            {**base, "client_encoding": sent, "datestyle": "german", "timezone": "europe/paris"},
        )
        assert not error, error
        assert told["client_encoding"] == canonical
        assert told["DateStyle"] == "German, DMY"
        assert told["TimeZone"] == "Europe/Paris"
    async with await psycopg.AsyncConnection.connect(
        proxy.dsn(db=role.database), client_encoding="euc-jp", autocommit=True
    ) as conn:
        assert conn.info.parameter_status("client_encoding") == "EUC_JP"
        assert conn.info.encoding == "euc_jp"
        cur = await conn.execute("SELECT 'é'")
        assert await cur.fetchone() == ("é",)
    a = await asyncpg.connect(proxy.dsn(db=role.database))  # sends client_encoding 'utf-8'
    try:
        assert a.get_settings().client_encoding == "UTF8"
    finally:
        await a.close()


async def test_settings_never_leak_to_the_next_client(make_proxy: ProxyFactory, role: Role) -> None:
    """Transaction mode, one server connection: A's SETs stay A's; B, new, is told and
    given the defaults, and its string escaping follows standard_conforming_strings=on."""
    proxy = await make_proxy(pool_mode="transaction", pool_size=1)
    dsn = proxy.dsn(db=role.database)
    a = await asyncpg.connect(dsn)
    try:
        await a.execute(
            "SET standard_conforming_strings = off; SET TimeZone = 'Asia/Tokyo';"
            " SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard'"
        )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as b:
            info = b.info
            assert info.parameter_status("standard_conforming_strings") == "on"
            assert info.parameter_status("TimeZone") != "Asia/Tokyo"
            assert info.parameter_status("DateStyle") == "ISO, MDY"
            cur = await b.execute("SELECT length('\\x41'), current_setting('TimeZone')")
            assert await cur.fetchone() == (4, info.parameter_status("TimeZone"))
            cur = await b.execute("SHOW DateStyle")
            assert await cur.fetchone() == ("ISO, MDY",)
            # A's turn on the same server connection, then B's again
            assert await a.fetchval("SHOW standard_conforming_strings") == "off"
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await a.fetchval("SELECT length('\\x41')") == 1
            assert a.get_settings().DateStyle == "SQL, DMY"
            cur = await b.execute("SHOW IntervalStyle")
            assert await cur.fetchone() == ("postgres",)
            # B's own SET is followed too, and told
            await b.execute("SET TimeZone = 'America/Lima'")
            assert info.parameter_status("TimeZone") == "America/Lima"
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            cur = await b.execute("SHOW TimeZone")
            assert await cur.fetchone() == ("America/Lima",)
    finally:
        await a.close()


@pytest.mark.parametrize("mode", MODES)
async def test_extra_startup_parameters_are_the_clients_own(
    make_proxy: ProxyFactory, role: Role, mode: str
) -> None:
    """Startup settings the server does not report (custom ones, search_path on
    PostgreSQL 15, -c of options) are applied per client, never to the next one."""
    proxy = await make_proxy(pool_mode=mode, pool_size=1)
    dsn = proxy.dsn(db=role.database)
    sql = "SELECT current_setting('app.tag', true), current_setting('statement_timeout')"
    tagged = await asyncpg.connect(
        dsn, server_settings={"app.tag": "alpha", "options": "-c statement_timeout=4321"}
    )
    try:
        assert tuple(await tagged.fetchrow(sql)) == ("alpha", "4321ms")
    finally:
        await tagged.close()
    plain = await asyncpg.connect(dsn)
    try:
        assert tuple(await plain.fetchrow(sql)) in (("", "0"), (None, "0"))
    finally:
        await plain.close()


async def test_startup_parameters_refused_or_ignored(make_proxy: ProxyFactory, role: Role) -> None:
    proxy = await make_proxy(ignore_startup_parameters=["Extra_Float_Digits"])
    base = {"user": "app", "database": role.database}
    # listed: dropped, not applied
    _, error = await raw_login(proxy.port, {**base, "extra_float_digits": "bogus"})
    assert not error
    # what the server refuses, it says (as at a direct login)
    _, error = await raw_login(proxy.port, {**base, "log_connections": "on"})
    assert b"C55P02\0" in error and b"cannot be set after connection start" in error
    _, error = await raw_login(proxy.port, {**base, "client_encoding": "bogus"})
    assert b"C22023\0" in error
    # what a pool cannot carry: 08P01, PgBouncer's words
    for params in ({"options": "-d 5"}, {"role": "postgres"}, {"bad name": "x"}):
        _, error = await raw_login(proxy.port, {**base, **params})
        assert b"C08P01\0" in error and b"unsupported startup" in error, error
    # the refused logins left the server connection fit for the next client
    told, error = await raw_login(proxy.port, base)
    assert not error and told["client_encoding"] == "UTF8"


async def test_a_repeated_startup_packet_is_judged_by_each_proxy_s_own_config(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Logins with the same packet share what it was found to ask for (a connection
    per transaction sends the same one), but that is only valid for the ignored names
    it was read with: a proxy that does not ignore a name still sends it on."""
    lenient = await make_proxy(ignore_startup_parameters=["extra_float_digits"])
    strict = await make_proxy()
    params = {"user": "app", "database": role.database, "extra_float_digits": "bogus"}
    for _ in range(2):  # the second time from what was kept
        _, error = await raw_login(lenient.port, params)
        assert not error
        _, error = await raw_login(strict.port, params)
        assert b"C22023\0" in error  # the server judged the value: not ignored here


async def _one_session(dsn: str, asked: dict[str, str], sql: str, show: str) -> tuple[str, str]:
    """A client that logs in with settings ``asked``, runs ``sql``, reads two columns
    of ``show`` and leaves."""
    conn = await asyncpg.connect(dsn, server_settings=asked)
    try:
        if sql:
            await conn.execute(sql)
        row = await conn.fetchrow(show)
        return row[0], row[1]
    finally:
        await conn.close()


async def test_the_same_settings_again_are_not_sent_again(
    make_proxy: ProxyFactory, role: Role, postgres: PostgresCluster
) -> None:
    """Transaction mode: a client that logs in with the settings the server connection's
    last client had, unchanged since, is served with no SQL to set them (what reached
    the server is tapped); a change since (that client's SET, other settings) sends them
    again. (Session mode's reset query changes them at every client's end.)"""
    relay = FaultRelay(postgres.port)
    try:
        proxy = await make_proxy(
            pool_mode="transaction", pool_size=1, upstream={"port": relay.port}
        )
        dsn = proxy.dsn(db=role.database)
        settings = {"application_name": "same-app", "app.tag": "t1"}
        show = "SELECT current_setting('application_name'), current_setting('app.tag', true)"

        async def session(asked: dict[str, str], sql: str = "") -> tuple[str, str]:
            return await _one_session(dsn, asked, sql, show)

        def sent_since(mark: int) -> bytes:
            assert len(relay.sent) == 1  # one server connection throughout
            return bytes(relay.sent[0][mark:])

        assert await session(settings) == ("same-app", "t1")
        mark = len(relay.sent[0])
        assert await session(settings) == ("same-app", "t1")
        assert b"set_config" not in sent_since(mark)  # nothing to set: no round trip
        assert b" TO E'" not in sent_since(mark)
        # that client changes one (told by the server): the next gets its own again
        mark = len(relay.sent[0])
        assert await session(settings, "SET application_name = 'changed'") == ("changed", "t1")
        assert await session(settings) == ("same-app", "t1")
        assert b"SET application_name TO E'same-app';" in sent_since(mark)
        # other settings, then the first ones again
        mark = len(relay.sent[0])
        name, tag = await session({"application_name": "other"})
        assert name == "other" and tag in ("", None)
        assert await session(settings) == ("same-app", "t1")
        assert sent_since(mark).count(b"SET application_name TO E'") >= 2
        assert sent_since(mark).count(b"set_config(E'app.tag'") >= 2
        # only what differs is set: here app.tag (back to its default), not the
        # application_name the connection already has
        mark = len(relay.sent[0])
        name, tag = await session({"application_name": "same-app"})
        assert name == "same-app" and tag in ("", None)
        sent = sent_since(mark)
        assert b"set_config(E'app.tag',NULL,false)" in sent
        assert b"application_name TO" not in sent
    finally:
        relay.close()


async def test_a_kept_settings_change_is_used_only_for_what_it_came_from(
    make_proxy: ProxyFactory, role: Role, postgres: PostgresCluster
) -> None:
    """Session mode: the settings change a login needs is kept on the server connection
    (the next client nearly always asks for the same), and used again only when the
    client's settings, the values the last client left (this reset query resets
    nothing) and the extra settings applied are all what it came from."""
    relay = FaultRelay(postgres.port)
    try:
        proxy = await make_proxy(
            pool_mode="session",
            pool_size=1,
            server_reset_query="SELECT 1",
            upstream={"port": relay.port},
        )
        dsn = proxy.dsn(db=role.database)
        show = "SELECT current_setting('TimeZone'), current_setting('statement_timeout')"

        async def session(asked: dict[str, str], sql: str = "") -> tuple[str, str]:
            return await _one_session(dsn, asked, sql, show)

        app = {"application_name": "kept-change"}
        zone, _ = await session(app)
        assert zone != "Asia/Tokyo"
        await session(app)  # the connection has them: nothing to change
        # that client leaves a setting changed: the next, asking the same, gets a
        # fresh login's value
        assert await session(app, "SET TimeZone = 'Asia/Tokyo'") == ("Asia/Tokyo", "0")
        assert (await session(app))[0] == zone
        # an extra setting applied by one login is not applied again for the next, even
        # when the first client put back the values the kept change started from
        with_timeout = {"application_name": "other-app", "statement_timeout": "1234"}
        back = "SET application_name = 'kept-change'"
        assert await session(with_timeout, back) == (zone, "1234ms")
        mark = len(relay.sent[0])
        assert await session(with_timeout) == (zone, "1234ms")
        assert len(relay.sent) == 1  # one server connection throughout
        sent = bytes(relay.sent[0][mark:])
        assert b"SET application_name TO E'other-app';" in sent
        assert b"statement_timeout TO" not in sent
    finally:
        relay.close()


async def test_session_logins_after_the_reset_check_their_settings_by_identity(
    make_proxy: ProxyFactory, role: Role
) -> None:
    """Session mode, DISCARD ALL, one server connection, clients asking for a setting
    the server took before (as pgbench does): each client's reset reports its
    application_name back to the default, and the next client asks for the same again.
    From the second client on, the reset gives the connection the very settings dict
    of the time before, and the settings change kept on it was made from that dict, so
    the login's checks are identity tests (what a login costs is measured by
    benchmarks/proxy.py). Each client is still told its own value."""
    proxy = await make_proxy(pool_mode="session", pool_size=1)
    login = {"user": "app", "database": role.database, "application_name": "same-each-time"}
    pools = proxy.server.manager.pools
    after_reset = []
    for _ in range(3):
        told, error = await raw_login(proxy.port, login)
        assert not error and told["application_name"] == "same-each-time"
        await wait_until(lambda: len(pools[role.database].idle) == 1, what="the reset done")
        (conn,) = pools[role.database].idle
        assert conn.pipeline.synced["application_name"] == ""  # the reset's report
        after_reset.append(conn.pipeline.synced)
    assert after_reset[0] == after_reset[1] and after_reset[1] is after_reset[2]
    assert conn.last_change is not None and conn.last_change[1] is after_reset[2]


async def test_settings_the_server_took_before_need_no_answer_at_login(
    make_proxy: ProxyFactory, role: Role, postgres: PostgresCluster
) -> None:
    """Session mode, one server connection: after a client's end (the reset query put
    its settings back), the next client asking for settings the server accepted before,
    spelled its way, logs in without waiting for the server: the relay mutes the server
    and the login completes, told its value."""
    relay = FaultRelay(postgres.port)
    try:
        proxy = await make_proxy(pool_mode="session", pool_size=1, upstream={"port": relay.port})
        login = {"user": "app", "database": role.database, "application_name": "seen-before"}
        told, error = await raw_login(proxy.port, login)
        assert not error and told["application_name"] == "seen-before"
        pool = proxy.server.manager.pools[role.database]
        for _ in range(200):  # the reset runs before the connection is idle again
            if pool.idle:
                break
            await asyncio.sleep(0.05)
        assert pool.idle
        relay.silence()
        told, error = await asyncio.wait_for(raw_login(proxy.port, login), 10)
        assert not error and told["application_name"] == "seen-before"
        learnt = pool.accepted[("application_name", "seen-before", "")]  # at the first login
        assert learnt == "seen-before"
        # what is remembered is bounded: clients can make up values without end
        for n in range(3 * ACCEPTED_SETTINGS):
            pool.accept({("application_name", f"made-up-{n}", ""): f"made-up-{n}"})
            assert len(pool.accepted) <= ACCEPTED_SETTINGS
    finally:
        relay.close()


async def test_settings_the_server_spells_its_own_way_need_no_answer_at_login(
    make_proxy: ProxyFactory, role: Role, postgres: PostgresCluster
) -> None:
    """Session mode, one server connection. asyncpg asks for client_encoding 'utf-8'
    (quotes included), which the server reports as UTF8; DateStyle ISO is reported as
    "ISO, MDY". After the first such login, the next ones neither wait for the server
    nor lose the spelling: each client is told the server's values, what the proxy
    keeps for the connection is what the server says, and with the server muted a
    login still completes. The logins ask for an application_name: the reset reports
    it back to its default, so each login sets the client's values again (without
    one, the last login's settings would be reused as they are)."""
    relay = FaultRelay(postgres.port)
    try:
        proxy = await make_proxy(pool_mode="session", pool_size=1, upstream={"port": relay.port})
        pool = proxy.server.manager.pools.get
        spelled = {"client_encoding": "UTF8", "DateStyle": "ISO, MDY"}
        login = {
            "user": "app",
            "database": role.database,
            "client_encoding": "'utf-8'",
            "datestyle": "iso",
            "application_name": "spelled",  # the reset reports it: the login sets it again
        }
        for _ in range(3):
            told, error = await raw_login(proxy.port, login)
            assert not error and {k: told[k] for k in spelled} == spelled
            await wait_until(lambda: len(pool(role.database).idle) == 1, what="the reset done")
        accepted = pool(role.database).accepted
        assert accepted[("client_encoding", "'utf-8'", "UTF8")] == "UTF8"
        a = await asyncpg.connect(
            proxy.dsn(db=role.database),
            server_settings={"DateStyle": "iso", "application_name": "spelled"},
        )
        try:
            server = {
                "client_encoding": await a.fetchval("SHOW client_encoding"),
                "DateStyle": await a.fetchval("SHOW DateStyle"),
            }
            assert server == spelled
            assert a.get_settings().client_encoding == "UTF8"
            (conn,) = pool(role.database).conns
            assert {k: conn.pipeline.synced[k] for k in spelled} == spelled
        finally:
            await a.close()
        await wait_until(lambda: len(pool(role.database).idle) == 1, what="the reset done")
        relay.silence()
        told, error = await asyncio.wait_for(raw_login(proxy.port, login), 10)
        assert not error and {k: told[k] for k in spelled} == spelled
    finally:
        relay.close()


def test_checked_setting_names_are_kept_within_their_bound() -> None:
    """Names a client makes up must not grow what is kept, and a kept name must still
    give the same answer as a new one: refused, ignored, canonical."""
    for n in range(3 * m.KEPT):
        assert client_settings({f"App.Made_Up_{n}": "1"}, frozenset()) == {f"app.made_up_{n}": "1"}
        assert len(parameters._SETTING_NAMES) <= m.KEPT
    for _ in range(2):  # the second time from what is kept
        assert client_settings({"datestyle": "ISO", "x": "1"}, frozenset({"x"})) == {
            "DateStyle": "ISO"
        }
        assert client_settings({"role": "admin"}, frozenset({"role"})) == {}
        for bad in ("role", "Is_Superuser", "bad name", "1x"):
            with pytest.raises(UnsupportedParameter):
                client_settings({bad: "on"}, frozenset())


def test_settings_sql_and_options() -> None:
    assert split_options(r"-c a=1 --b-c=2 -cd=x\ y") == [("a", "1"), ("b_c", "2"), ("d", "x y")]
    assert client_settings(
        {"user": "u", "TIMEZONE": "UTC", "options": "-c X.Y=1"}, frozenset()
    ) == {
        "TimeZone": "UTC",
        "x.y": "1",
    }
    assert settings_sql({"a": "1"}, {"a": "1"}) == ""
    assert settings_sql(
        {"TimeZone": "UTC", "statement_timeout": "1s", "b": "2"},
        {"application_name": "it's", "a": "1"},
        reset_missing=True,
    ) == (
        "SET application_name TO E'it''s';RESET TimeZone;RESET statement_timeout;"
        "SELECT pg_catalog.set_config(E'a',E'1',false),pg_catalog.set_config(E'b',NULL,false);"
    )
    assert settings_sql({"a": "1", "b": "2"}, {"a": "it's\\"}, reset_missing=True) == (
        "SELECT pg_catalog.set_config(E'a',E'it''s\\\\',false),"
        "pg_catalog.set_config(E'b',NULL,false);"
    )


# for each PLAIN_SET name, values that a SET could read differently from set_config()
# (lists, quotes, case, spaces): a name added there without values here fails
PLAIN_VALUES = {
    "application_name": ["My App, \"x\" 'y' \\z", ""],
    "client_encoding": ["utf-8"],
    "DateStyle": ["German, DMY", "iso,ymd"],
    "IntervalStyle": ["iso_8601"],
    "TimeZone": ["Asia/Tokyo", "-03:30", "europe/paris"],
    "standard_conforming_strings": ["off"],
    "default_transaction_read_only": ["on"],
    "extra_float_digits": ["1"],
    "statement_timeout": ["1min"],
    "lock_timeout": ["250"],
    "idle_in_transaction_session_timeout": ["5s"],
}


async def test_a_plain_set_means_what_set_config_means(postgres: PostgresCluster) -> None:
    """On the real server, each setting settings_sql() applies with SET ends up as the
    same value as with set_config() (which takes a value as a startup packet gives it),
    a bad value is refused the same way, and a list of names still uses set_config()."""
    assert set(PLAIN_VALUES) == PLAIN_SET
    # no statement cache: DISCARD ALL drops the server's prepared statements
    conn = await asyncpg.connect(postgres.dsn(), statement_cache_size=0)
    try:
        for name in sorted(PLAIN_SET):
            for value in PLAIN_VALUES[name]:
                sql = settings_sql({}, {name: value})
                assert sql.startswith(f"SET {name} TO E'")
                await conn.execute("DISCARD ALL")
                await conn.execute(sql)
                plain = await conn.fetchval("SELECT current_setting($1)", name)
                await conn.execute("DISCARD ALL")
                await conn.execute("SELECT pg_catalog.set_config($1,$2,false)", name, value)
                assert plain == await conn.fetchval("SELECT current_setting($1)", name)
                await conn.execute(settings_sql({name: value}, {}, reset_missing=True))
                reset = await conn.fetchval("SELECT current_setting($1)", name)
                await conn.execute("DISCARD ALL")
                assert reset == await conn.fetchval("SELECT current_setting($1)", name)
        for sql in (
            settings_sql({}, {"TimeZone": "Mars/Olympus"}),
            "SELECT pg_catalog.set_config('TimeZone','Mars/Olympus',false)",
        ):
            with pytest.raises(asyncpg.InvalidParameterValueError):
                await conn.execute(sql)
        # a batch runs as one Query, one implicit transaction: a bad value, after good
        # ones of both kinds, leaves none of them applied
        batch = {"application_name": "half", "app.tag": "x", "work_mem": "lots"}
        sql = settings_sql({}, batch)
        assert sql.index("SET application_name") < sql.index("'work_mem'")
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.execute(sql)
        show = "SELECT current_setting('application_name'), current_setting('app.tag', true)"
        assert tuple(await conn.fetchrow(show)) in (("", None), ("", ""))
        path = '"$user", Public, "Mixed Case"'
        sql = settings_sql({}, {"search_path": path})
        assert "set_config" in sql
        await conn.execute(sql)
        assert await conn.fetchval("SHOW search_path") == path
    finally:
        await conn.close()
