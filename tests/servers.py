"""Real servers for tests, each on 127.0.0.1 and a port chosen at runtime, always stopped.

- ``s3_server``: moto's S3 in server mode (``ThreadedMotoServer``, port 0) with one bucket;
  the AWS environment variables point boto3 at it while the fixture lives.
- ``postgres``: a throwaway PostgreSQL cluster (``initdb`` under a temporary folder, started
  with ``pg_ctl``): no root state, nothing shared with another test run.
- ``mlflow_server``: ``mlflow server`` on that PostgreSQL with artifacts on the S3 bucket
  (``--artifacts-destination s3://<bucket>/mlflow --serve-artifacts``): the team setup.

``tests/conftest.py`` re-exports the fixtures, so any test (the fault tests too) can ask for
them by name. PostgreSQL missing is a failure, not a skip: CI machines have Debian's package.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.process import ExitedEarly, free_port, wait_healthy

# Dummy credentials for moto only: they open nothing anywhere else.
S3_ENV = {"AWS_ACCESS_KEY_ID": "rlhf-test-key-id", "AWS_SECRET_ACCESS_KEY": "rlhf-test-secret-9f3c",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]
    """What a subprocess needs to reach the bucket (endpoint and credentials)."""

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs(self.env))


def _boto_kwargs(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto S3 on a free port with bucket ``rlhf-test``; ``AWS_ENDPOINT_URL_S3`` and dummy
    credentials are set in ``os.environ`` (boto3 reads them natively) and restored after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint,
           "RLHF_CACHE_DIR": str(tmp_path_factory.mktemp("rlhf_cache"))}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    try:
        s3 = S3Server(endpoint, "rlhf-test", env)
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found (apt-get install postgresql; .ci/run does)")
    return found


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres():
    """A fresh PostgreSQL cluster on a free port (trust auth, 127.0.0.1 only), removed after.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
    user (Debian's package creates it) and runs through ``runuser``."""
    as_user: list[str] = []
    data_root = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data_root, "postgres")
    data, sock = data_root / "data", data_root
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=120)
    run(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    port, started = None, False
    try:
        for _ in range(5):  # a port free a moment ago may be taken by now: try another
            port = free_port()
            opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
            try:
                run(_pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l",
                    str(data_root / "log"), "-w", "-t", "60", "start")
                started = True
                break
            except subprocess.CalledProcessError:
                continue
        if not started:
            pytest.fail(f"PostgreSQL did not start: {(data_root / 'log').read_text()[-2000:]}")
        yield Postgres("127.0.0.1", port, "postgres")
    finally:
        if started:
            subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=120)
        shutil.rmtree(data_root, ignore_errors=True)


def create_database(pg: Postgres, name: str) -> str:
    """A new database on ``pg``; -> its SQLAlchemy URL."""
    import psycopg

    # autocommit: CREATE DATABASE cannot run inside a transaction.
    with psycopg.connect(host=pg.host, port=pg.port, user=pg.user, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url(name)


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    backend_store_uri: str
    artifacts_destination: str


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        wait_healthy(f"{url}/health", proc, timeout)
    except ExitedEarly as e:
        raise RuntimeError(f"mlflow server exited ({e.code}): {log.read_text()[-3000:]}") from None
    except TimeoutError:
        raise RuntimeError(f"mlflow server not healthy after {timeout} s: "
                           f"{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="session")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """``mlflow server`` on a new PostgreSQL database with artifacts proxied to
    ``s3://<bucket>/mlflow``; only the server has the S3 settings (clients need none)."""
    backend = create_database(postgres, "mlflow")
    dest = f"s3://{s3_server.bucket}/mlflow"
    log = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(s3_server.env)
    # MLflow 3's server starts 7 huey worker processes for GenAI jobs (trace rollups, judges)
    # that nothing here uses; on 2 cores their start-up alone costs tens of seconds.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = port = None
    for _ in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                 "--artifacts-destination", dest, "--serve-artifacts", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, log, timeout=120)
            break
        except RuntimeError:
            _stop(proc)
            if "address already in use" not in log.read_text().lower():
                raise
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", backend, dest)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it forked (its own process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever of the group outlived the server (uvicorn or job workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
