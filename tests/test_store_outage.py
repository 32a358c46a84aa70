"""The PostgreSQL server goes away under a running daemon and comes back: nothing is lost or recorded twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolwatch.pipeline.store import Store

from .pg_server import Server
from .test_daemon import Daemon, wait_for, write_images


@pytest.fixture
def own_server(postgres_server: object) -> object:
    """A server of this test's own (the session's serves other tests): it is stopped and started again here."""
    server = Server()
    server.port += 1  # the session's server (same pid) has the base port
    server.start()
    yield server
    server.stop()


def ok_count(url: str) -> int:
    with Store.connect(url, "observer", busy_timeout=2) as store:
        return store.counts_by_status()["ok"]


def test_a_server_restart_under_a_running_node_loses_nothing(tmp_path: Path, own_server: Server,
                                                             daemons: list[Daemon]) -> None:
    url = own_server.url(own_server.database())
    inp = (tmp_path / "in").resolve()
    inp.mkdir()
    node = Daemon(tmp_path, [inp], (tmp_path / "shared").resolve(), "node.name=a", "store.busy_timeout=2",
                  name="a", env={"POOLWATCH_STORE_URL": url})
    daemons.append(node)
    node.start()
    write_images(inp, [(f"before_{i}.jpg", 100 + i) for i in range(10)])
    wait_for(lambda: ok_count(url) == 10, 60, "the first files", node)

    own_server.halt()
    write_images(inp, [(f"during_{i}.jpg", 200 + i) for i in range(10)])  # events while the store is gone
    wait_for(lambda: "could not" in node.log().lower() or "restart" in node.log().lower() or node.proc.poll() is not None,  # type: ignore[union-attr]
             60, "the node to notice the lost store")
    own_server.start()
    if node.proc.poll() is not None:  # type: ignore[union-attr]
        node.start()  # it gave up (as systemd or docker would restart it)
    write_images(inp, [(f"after_{i}.jpg", 300 + i) for i in range(5)])
    wait_for(lambda: ok_count(url) == 25, 120, "every file once the server is back", node)
    with Store.connect(url, "observer") as store:
        assert store.row_problems() == [] and len(store.images()) == 25
