import faulthandler
import os
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
faulthandler.enable()

from s3_services import CREDENTIALS, MotoServer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def aws_test_credentials() -> Iterator[None]:
    """Dummy credentials for the loopback S3 (moto accepts any); never real ones."""
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_PROFILE", "AWS_CONFIG_FILE",
                                            "AWS_SHARED_CREDENTIALS_FILE")}
    os.environ.update(CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the session (stopped by PID at the end)."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.kill()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name
