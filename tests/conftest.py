import os
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import SHARED_DATA, build_bert, build_tokenizer, read_lines  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"the real datasets are expected in {SHARED_DATA} (the shared/ folder beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wikiqa_sample(tmp_path_factory, shared_data) -> Path:
    """The first 120 pairs of the real WikiQA train file, in its own format (CRLF, tab-separated)."""
    path = tmp_path_factory.mktemp("wikiqa") / "WikiQA-sample.tsv"
    lines = read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 121)
    path.write_text("".join(lines), newline="")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, shared_data) -> Path:
    texts = []
    for line in read_lines(shared_data / "wikiqa" / "WikiQA-train.tsv.gz", 2000)[1:]:
        cols = line.rstrip("\r\n").split("\t")
        texts += [cols[1], cols[5]]
    for line in read_lines(shared_data / "rte" / "train.tsv", 500)[1:]:
        texts += line.split("\t")[:2]
    return build_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Three 2-class teachers that share one tokenizer but differ in their seeds."""
    base = tmp_path_factory.mktemp("teachers")
    return {f"t{s}": build_bert(base / f"t{s}", tiny_tokenizer, num_labels=2, seed=s) for s in (1, 2, 3)}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run builds its own Accelerator, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def encoder(tiny_teachers):
    """The student's encoder in the trainer tests: a tiny teacher folder."""
    return tiny_teachers["t1"]


@contextmanager
def environment(env: dict[str, str]):
    """Set these environment variables (subprocesses inherit them), and put back what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, a free port; tmkd finds it the standard way:
    AWS_ENDPOINT_URL and the AWS_* credentials in the environment (subprocesses inherit them)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with environment(env):
        yield env["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory):
    """A GCS API on 127.0.0.1 (fake-gcs-server and a front for obstore's writes: tests/gcs_front.py), found the
    way tmkd finds any GCS emulator: STORAGE_EMULATOR_HOST, GOOGLE_BASE_URL, GOOGLE_BEARER_TOKEN."""
    import gcs_front

    gcs = gcs_front.FakeGCS(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log").start()
    with environment(gcs_front.environment(gcs)):
        yield gcs
    gcs.stop()


@pytest.fixture
def gs_store(gcs_endpoint) -> str:
    """A fresh bucket for one test; returns the store's URI, gs://<bucket>/store."""
    import uuid

    bucket = f"tmkd-{uuid.uuid4().hex[:12]}"
    gcs_endpoint.create_bucket(bucket)
    return f"gs://{bucket}/store"


@pytest.fixture(params=["s3", "gs"])
def bucket_store(request) -> str:
    """The same test on S3 (moto) and on GCS (fake-gcs-server)."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def s3_store(s3_endpoint) -> str:
    """A fresh bucket for one test; returns the store's URI, s3://<bucket>/store."""
    import uuid

    import boto3

    bucket = f"tmkd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"
