"""Tests of the Python SDK against the real `stardust domain` and `stardust node` binaries."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import stardust

ROOT = Path(__file__).resolve().parents[3]
DOC = (ROOT / "docs" / "protocol.md").read_text()


def binary() -> str:
    path = os.environ.get("STARDUST_BIN") or str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / "stardust")
    if not Path(path).exists():
        pytest.fail(f"the stardust binary is missing at {path}: build it (cargo build -p stardust) or set STARDUST_BIN")
    return path


def vector(name: str) -> str:
    for line in DOC.splitlines():
        if line.startswith(name + ": "):
            return line[len(name) + 2:]
    raise AssertionError(f"docs/protocol.md has no vector {name!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_signature_matches_the_protocol_vector():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector("secret_key")))
    headers = stardust.sign_request(key, "POST", "/v1/jobs", 1_700_000_000_000, b"{}")
    assert headers["x-stardust-key"] == vector("node_id")
    assert headers["x-stardust-signature"] == vector("request_signature(POST /v1/jobs, time 1700000000000, body {})")
    assert stardust.content_id(b"stardust") == vector('content_id("stardust")')


def test_key_files_are_private_and_compatible(tmp_path):
    path = tmp_path / "k.key"
    key = stardust.load_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # The Rust CLI reads the same file and prints the same id.
    out = subprocess.run([binary(), "keys", "show", "--key", str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == stardust._public_hex(key)
    path.chmod(0o644)
    with pytest.raises(stardust.KeyFileError, match="readable by others"):
        stardust.load_key(path)


@pytest.fixture
def domain(tmp_path):
    port = free_port()
    procs = []
    log = open(tmp_path / "domain.log", "w")
    procs.append(subprocess.Popen([binary(), "domain", "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "d"),
                                   "--welcome-grant", "1000"],
                                  stdout=log, stderr=log, stdin=subprocess.DEVNULL))
    url = f"http://127.0.0.1:{port}"
    client = stardust.Client(url, tmp_path / "client.key")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.health()
            break
        except stardust.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    nlog = open(tmp_path / "node.log", "w")
    procs.append(subprocess.Popen([binary(), "node", "--domain", url, "--data", str(tmp_path / "n"), "--slots", "2", "--no-bench"],
                                  stdout=nlog, stderr=nlog, stdin=subprocess.DEVNULL))
    yield client, tmp_path
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_a_small_job_end_to_end(domain):
    client, tmp = domain
    (tmp / "hello.wasm").write_bytes((ROOT / "test-programs" / "hello.wasm").read_bytes())
    (tmp / "in.txt").write_text("python")
    (tmp / "job.toml").write_text(
        'name = "py"\nmodule = "hello.wasm"\ninput = "in.txt"\nargs = ["{x}"]\nredundancy = 1\nseed = 3\n'
        '[limits]\nmemory = "32MiB"\ntimeout = "10s"\n[sweep.grid]\nx = [1, 2, 3]\n'
    )
    quote = client.quote(tmp / "job.toml")
    assert quote["tasks"] == 3 and quote["max_cost"] > 0
    assert quote["balance"] == 0, "the welcome grant comes with the first submission"
    job = client.submit(tmp / "job.toml")
    seen = []
    final = client.wait(job, progress=seen.append, timeout=60)
    assert final["state"] == "completed"
    assert final["tasks_verified"] == 3
    assert seen, "progress was reported"
    assert client.status(job, wait_ms=60_000)["state"] == "completed", "an ended job is answered at once"
    with pytest.raises(stardust.ApiError) as e:
        client.status(job, wait_ms=60_001)
    assert e.value.status == 400 and e.value.code == "invalid_wait"
    results = sorted(client.results(job), key=lambda r: r["index"])
    assert [r["output_text"] for r in results] == [f"hello from task with 1 args: {i}\nPYTHON" for i in (1, 2, 3)]
    assert any(n["state"] == "online" for n in client.nodes())
    assert client.download(results[0]["output"]).decode().startswith("hello from task")
    # Paid: the welcome grant minus what the three verified tasks cost; nothing left in escrow.
    balances = client.account()
    assert 0 < 1000 * 10**6 - balances["submitter"] < quote["max_cost"]
    assert set(balances) == {"submitter", "operator", "author", "stake"}
    # Submission and the wait in one request, answered with the results.
    ran = client.run(tmp / "job.toml", wait_ms=60_000)
    assert ran["job"]["state"] == "completed" and ran["job"]["job_id"] == ran["job_id"] != job
    assert sorted(r["output_text"] for r in ran["results"]) == [r["output_text"] for r in results]
    with pytest.raises(stardust.ApiError) as e:
        client.run(tmp / "job.toml", wait_ms=60_001)
    assert e.value.status == 400 and e.value.code == "invalid_wait"


def test_an_unaffordable_job_is_refused_with_a_typed_error(domain):
    client, tmp = domain
    module = client.upload((ROOT / "test-programs" / "hello.wasm").read_bytes())
    spec = {"module": module, "input": client.upload(b""), "redundancy": 3, "args": ["{x}"],
            "limits": {"fuel": 10**13, "memory_bytes": 1 << 24, "wall_ms": 1000, "output_bytes": 1024},
            "sweep": {"grid": {"x": list(range(100))}}}
    quote = client.quote(spec)
    assert quote["affordable"] is False and quote["max_cost"] > 1000 * 10**6
    with pytest.raises(stardust.ApiError) as e:
        client.submit(spec)
    assert e.value.status == 402 and e.value.code == "insufficient_credits"
    assert "stardust ledger grant" in e.value.message
    with pytest.raises(stardust.JobFileError):
        stardust.credits_to_micro("1.0000001")
    assert stardust.credits_to_micro("2.5") == 2_500_000


def test_api_errors_are_typed(domain):
    client, tmp = domain
    with pytest.raises(stardust.ApiError) as e:
        client.status(999)
    assert e.value.status == 404 and e.value.code == "not_found"
    with pytest.raises(stardust.ApiError) as e:
        client.submit({"module": stardust.content_id(b"never uploaded"), "input": client.upload(b"")})
    assert e.value.code == "missing_blob"
    with pytest.raises(stardust.JobFileError):
        client.submit(tmp / "no-such-job.toml")
    with pytest.raises(stardust.TransportError):
        stardust.Client(f"http://127.0.0.1:{free_port()}", tmp / "client.key", timeout=2).health()
    with pytest.raises(stardust.StardustError):
        stardust.Client("ftp://example", tmp / "client.key")


def test_signing_times_only_grow(tmp_path):
    # Thousands of requests signed within a few milliseconds: each gets its own time, so two
    # identical POSTs never share a signature (the domain would refuse the second as a replay).
    client = stardust.Client("http://127.0.0.1:9", tmp_path / "client.key")
    times = [client._signing_time() for _ in range(5000)]
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] >= int(time.time() * 1000) - 1
