"""PostgreSQL taken away from the bastion processes of one test, and from nothing else.

Other tests run on the same PostgreSQL server at the same time, so nothing here touches a
connection or object that is not this test's: the bastion processes connect with a unique
``application_name`` (bastion names every connection after it, see `bastion.db.connect`) and, when
a test needs to keep one of them out, as a login role of the test's own, which `block` stops from
logging in (``ALTER ROLE ... NOLOGIN``) and whose backends it terminates. The server's own
settings are never changed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict


class Outage:
    """``schema_url``: the test's schema (the ``postgres_url`` fixture); ``admin_url``: the
    server, as the user that made it."""

    def __init__(self, schema_url: str, admin_url: str) -> None:
        self.admin_url = admin_url
        self.tag = f"bt-{uuid.uuid4().hex[:10]}"
        options = conninfo_to_dict(schema_url)["options"]
        self.schema = options.removeprefix("-csearch_path=")
        self.roles: list[str] = []

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True)

    def url(self, role: str | None = None) -> str:
        """A URL on the test's schema, named after its tag, as ``role`` (made by `role`)."""
        server = conninfo_to_dict(self.admin_url)
        user = role or server["user"]
        where = f"{server.get('host', '127.0.0.1')}:{server.get('port', 5432)}/{server['dbname']}"
        options = quote(f"-csearch_path={self.schema}")
        return f"postgresql://{user}@{where}?options={options}&application_name={self.tag}"

    def role(self) -> str:
        """A new login role of this test's. The first one owns the schema, so it must be the
        first to start bastion (which creates the tables); the others act as members of it."""
        name = f"{self.tag.replace('-', '_')}_{len(self.roles)}"
        with self._admin() as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN")
            if self.roles:
                conn.execute(f"GRANT {self.roles[0]} TO {name}")
            else:
                conn.execute(f"ALTER SCHEMA {self.schema} OWNER TO {name}")
        self.roles.append(name)
        return name

    def backends(self) -> list[tuple[int, str, str]]:
        """(pid, application_name, role) of every backend of this test's bastion processes."""
        with self._admin() as conn:
            return conn.execute(
                "SELECT pid, application_name, usename FROM pg_stat_activity"
                " WHERE application_name LIKE %s",
                (f"{self.tag}/%",),
            ).fetchall()

    def terminate(self, role: str | None = None) -> list[str]:
        """Terminate the backends of this test's bastion processes (only those logged in as
        ``role``, if given); return their application names."""
        with self._admin() as conn:
            rows = conn.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE %s AND (%s::text IS NULL OR usename = %s)",
                (f"{self.tag}/%", role, role),
            ).fetchall()
        return sorted(name for name, _ in rows)

    def block(self, role: str) -> None:
        """``role`` can no longer log in, and its connections are ended: to its processes the
        database is down until `unblock`."""
        with self._admin() as conn:
            conn.execute(f"ALTER ROLE {role} NOLOGIN")
        self.terminate(role)

    def unblock(self, role: str) -> None:
        with self._admin() as conn:
            conn.execute(f"ALTER ROLE {role} LOGIN")

    def drop(self) -> None:
        """Give everything the roles own back to the fixture's user, then drop them."""
        if not self.roles:
            return
        roles = ", ".join(self.roles)
        with self._admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
                (self.roles,),
            )
            conn.execute(f"REASSIGN OWNED BY {roles} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {roles}")
            for role in reversed(self.roles):
                conn.execute(f"DROP ROLE {role}")


class CommitCut:
    """A TCP relay in front of PostgreSQL that, once `arm` is called, lets the next ``COMMIT``
    through and then ends the connection without relaying the server's answer: the transaction
    is committed, and the client sees its connection lost while committing (what a failover or a
    dropped network path can do at that moment)."""

    def __init__(self, url: str) -> None:
        given = conninfo_to_dict(url)
        self.server = (given.get("host", "127.0.0.1"), int(given.get("port", 5432)))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = url.replace(f"{self.server[0]}:{self.server[1]}", f"127.0.0.1:{self.port}", 1)
        assert self.url != url, f"no {self.server[0]}:{self.server[1]} in {url}"
        self._armed = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self.cut.clear()
        self._armed.set()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.server)
            cutting = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cutting), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cutting), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self._armed.is_set() and b"COMMIT" in data:
                    self._armed.clear()
                    cutting.set()  # before the server can answer it
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cutting.is_set():
                    # The server answered the COMMIT: it is applied. The client never hears so.
                    self.cut.set()
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    server.close()
                    return
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)
