"""Throwaway PostgreSQL clusters and Redis servers on loopback, for tests, the demo and the
benchmark. Everything started here is stopped at exit (also on Ctrl-C); nothing else is ever
signalled. PostgreSQL refuses to run as root, so clusters run as the OS user `postgres`.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"
_started: list = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conf_value(v) -> str:
    """A postgresql.conf value: numbers and on/off as they are, anything else quoted."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)) or v in ("on", "off"):
        return str(v)
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == "'":
        return v
    return "'" + str(v).replace("'", "''") + "'"


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", RUN_AS, "--"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def _chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(RUN_AS)
    os.chown(path, user.pw_uid, user.pw_gid)


def _stop_all() -> None:
    for server in reversed(_started):
        try:
            server.stop()
        except Exception:
            pass


atexit.register(_stop_all)


class RedisServer:
    """A redis-server child process without persistence."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        _started.append(self)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis on port {self.port} did not start")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: Redis dies mid-request, as in a crash."""
        if self.running():
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: Redis keeps its sockets open but answers nothing."""
        if self.running():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()


class PgCluster:
    """A PostgreSQL 15 cluster in a temporary directory, with twotier preloaded."""

    def __init__(self, settings: dict | None = None, port: int | None = None, name: str = "pg"):
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"twotier-{name}-"))
        _chown_tree(self.base)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_preload_libraries": "'twotier'",
            "max_connections": "50",
            "twotier.l1_size_mb": "16",
        }
        self.settings.update({k: conf_value(v) for k, v in (settings or {}).items()})
        self.running = False
        _started.append(self)

    def init(self) -> "PgCluster":
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale", "C"])
        self._write_conf()
        return self

    def _write_conf(self) -> None:
        lines = [f"port = {self.port}"] + [f"{k} = {v}" for k, v in self.settings.items()]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# twotier test settings\n" + "\n".join(lines) + "\n")

    def set(self, settings: dict) -> None:
        """Appends settings (last one wins); call reload() or restart() after."""
        self.settings.update({k: conf_value(v) for k, v in settings.items()})
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {conf_value(v)}\n")

    def start(self) -> "PgCluster":
        if not self.data.exists():
            self.init()
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
            self.running = False

    def restart(self) -> "PgCluster":
        self.stop()
        return self.start()

    def reload(self) -> None:
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "reload"])
        time.sleep(0.3)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kw) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, **kw)

    def sql(self, query: str, *args, dbname: str = "postgres"):
        """Runs one statement in a fresh session; returns all rows (or None)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else None

    def createdb(self, name: str) -> None:
        self.sql(f'CREATE DATABASE "{name}"')

    def replica(self, name: str = "replica") -> "PgCluster":
        """A streaming replica of this cluster (pg_basebackup -R), not started."""
        rep = PgCluster(name=name)
        _as_postgres([str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                      "-D", str(rep.data), "-R", "-X", "stream", "--no-sync"])
        rep.settings = dict(self.settings)
        rep.settings["unix_socket_directories"] = f"'{rep.base}'"
        rep.settings["hot_standby"] = "on"
        rep._write_conf()
        return rep

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
