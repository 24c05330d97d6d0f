"""The library on a real S3-compatible server (moto in server mode on localhost)."""

import socket

import pytest
import torch

from quiver.errors import QuiverError
from quiver.library import Library


@pytest.fixture(scope="module")
def s3_url():
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="experts")
    yield endpoint
    server.stop()


def _options(endpoint):
    return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint,
                                                               "region_name": "us-east-1"}}


def test_library_round_trip_on_s3(s3_url, tiny_library, tmp_path):
    options = _options(s3_url)
    with pytest.raises(QuiverError, match="no library at"):
        Library("s3://experts/shared", storage_options=options)
    remote = Library("s3://experts/shared", create=True, storage_options=options)
    base = tiny_library.base
    remote.ensure_base(base["name"], base["fingerprint"], base["modules"])
    for name in tiny_library.names():
        remote.add(tiny_library.get(name))

    # a second client (as another machine would) sees the same experts
    other = Library("s3://experts/shared", storage_options=options)
    assert other.names() == ["alpha", "beta"]
    local = tiny_library.get("alpha").weights
    for key, value in other.get("alpha").weights.items():
        assert torch.equal(value, local[key])

    other.put_derived("beta", "proto", {"k": 1}, {"v": torch.ones(2)}, {"m": 1})
    other.rename("beta", "second")
    assert remote.names() == ["alpha", "second"]
    tensors, meta = remote.get_derived("second", "proto", {"k": 1})
    assert torch.equal(tensors["v"], torch.ones(2)) and meta == {"m": 1}

    remote.export_peft("alpha", str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    remote.remove("second")
    assert other.names() == ["alpha"]


def test_half_written_expert_on_s3_is_invisible(s3_url, tiny_library):
    options = _options(s3_url)
    remote = Library("s3://experts/partial", create=True, storage_options=options)
    base = tiny_library.base
    remote.ensure_base(base["name"], base["fingerprint"], base["modules"])
    # an add that died after the weights but before quiver.json (the commit point)
    remote.fs.pipe_file(f"{remote.root}/experts/ghost/adapter_model.safetensors", b"partial")
    assert remote.names() == []
    with pytest.raises(QuiverError, match="no expert named"):
        remote.get("ghost")
