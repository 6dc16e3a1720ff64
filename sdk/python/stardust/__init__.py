"""Python client of a Stardust domain's REST API v1 (see docs/protocol.md, section 5b).

Every request is signed with the client's Ed25519 key; the domain identifies the client by it,
and a job's results are readable only by the key that submitted it.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "Client",
    "StardustError",
    "ApiError",
    "TransportError",
    "KeyFileError",
    "JobFileError",
    "content_id",
    "credits_to_micro",
    "load_key",
    "sign_request",
]

KEY_HEADER = "x-stardust-key"
TIME_HEADER = "x-stardust-time"
SIGNATURE_HEADER = "x-stardust-signature"
_KEY_FILE_HEADER = "stardust-secret-key-v1"
_CONTEXT = b"stardust/v1/request"
_MAX_SAFE_INTEGER = (1 << 53) - 1


class StardustError(Exception):
    """Base of every error this SDK raises."""


class ApiError(StardustError):
    """The domain answered with an error: HTTP status, stable code, message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class TransportError(StardustError):
    """The domain could not be reached, or answered something that is not JSON."""


class KeyFileError(StardustError):
    """A key file is missing, malformed or readable by others."""


class JobFileError(StardustError):
    """A job file or spec is not usable."""


def credits_to_micro(value: Any, what: str = "amount") -> int:
    """Credits (``10``, ``0.5``, ``"1.25"``) as integer micro-credits, exactly."""
    import decimal
    try:
        d = decimal.Decimal(str(value))
    except decimal.InvalidOperation as e:
        raise JobFileError(f"{what}: {value!r} is not an amount of credits") from e
    micro = d * 1_000_000
    if d < 0 or micro != micro.to_integral_value():
        raise JobFileError(f"{what}: {value!r} must be positive with at most 6 decimals")
    return int(micro)


def content_id(data: bytes) -> str:
    """The content id of bytes: ``b3:`` + BLAKE3 hex."""
    return "b3:" + blake3.blake3(data).hexdigest()


def load_key(path: Union[str, os.PathLike], create: bool = True) -> Ed25519PrivateKey:
    """Reads a key file (``stardust keys new`` format), creating it (mode 0600) if asked."""
    p = Path(path).expanduser()
    if not p.exists():
        if not create:
            raise KeyFileError(f"{p}: no such key file")
        p.parent.mkdir(parents=True, exist_ok=True)
        secret = os.urandom(32)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{_KEY_FILE_HEADER}\n{secret.hex()}\n")
        return Ed25519PrivateKey.from_private_bytes(secret)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{p}: key file is readable by others (mode {mode:o}); run `chmod 600 {p}`")
    lines = p.read_text().split("\n")
    if len(lines) < 2 or lines[0] != _KEY_FILE_HEADER or len(lines[1].strip()) != 64:
        raise KeyFileError(f"{p}: not a stardust key file")
    try:
        secret = bytes.fromhex(lines[1].strip())
    except ValueError as e:
        raise KeyFileError(f"{p}: not a stardust key file") from e
    return Ed25519PrivateKey.from_private_bytes(secret)


def _public_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign_request(key: Ed25519PrivateKey, method: str, path_and_query: str, time_ms: int, body: bytes) -> Dict[str, str]:
    """The three signature headers for a request (docs/protocol.md §5b)."""
    message = b"".join(
        [
            _CONTEXT,
            b"\x00",
            method.encode(),
            b"\n",
            path_and_query.encode(),
            b"\n",
            str(time_ms).encode(),
            b"\n",
            blake3.blake3(body).hexdigest().encode(),
        ]
    )
    return {
        KEY_HEADER: _public_hex(key),
        TIME_HEADER: str(time_ms),
        SIGNATURE_HEADER: key.sign(message).hex(),
    }


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30,
               "KB": 10**3, "kB": 10**3, "MB": 10**6, "GB": 10**9}
_TIME_UNITS = {"ms": 1, "": 1000, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000}


def _parse_unit(value: Any, units: Dict[str, int], what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise JobFileError(f"{what}: expected a number or a string like '256MiB'")
    text = value.strip()
    i = 0
    while i < len(text) and text[i].isdigit():
        i += 1
    if i == 0 or text[i:].strip() not in units:
        raise JobFileError(f"{what}: cannot read {value!r}")
    return int(text[:i]) * units[text[i:].strip()]


class Client:
    """A client of one domain, acting as one key."""

    def __init__(self, url: str, key_path: Union[str, os.PathLike] = "~/.stardust/client.key",
                 ca_file: Optional[str] = None, timeout: float = 60.0):
        url = url.rstrip("/")
        if not (url.startswith("http://") or url.startswith("https://")) or url.count("/") != 2:
            raise StardustError(f"invalid domain URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url
        self.key = load_key(key_path)
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
        self._last_time = 0
        self._clock = threading.Lock()

    @property
    def id(self) -> str:
        """The client's NodeId (public key, hex)."""
        return _public_hex(self.key)

    def _signing_time(self) -> int:
        """The clock in ms, but later than every time this client signed with before: the
        domain takes a POST signature once, so two identical submissions in one millisecond
        must not sign the same bytes."""
        with self._clock:
            self._last_time = max(int(time.time() * 1000), self._last_time + 1)
            return self._last_time

    def _request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
        headers = sign_request(self.key, method, path, self._signing_time(), body)
        headers["content-type"] = content_type
        req = urllib.request.Request(self.url + path, data=body if method in ("POST", "PUT") else None,
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                raise ApiError(e.code, err.get("code", "http_error"), err.get("message", "")) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.code, "http_error", raw.decode("utf-8", "replace")) from None
        except (urllib.error.URLError, OSError) as e:
            raise TransportError(f"cannot reach the domain at {self.url}: {e}") from e

    def _json(self, method: str, path: str, body: bytes = b"") -> Any:
        raw = self._request(method, path, body)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise TransportError(f"unexpected answer from the domain: {raw[:200]!r}") from e

    # -- API ------------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /v1/health``."""
        return self._json("GET", "/v1/health")

    def upload(self, data: bytes) -> str:
        """Uploads bytes; returns their content id."""
        cid = content_id(data)
        self._request("PUT", f"/v1/blobs/{cid}", data, "application/octet-stream")
        return cid

    def download(self, cid: str) -> bytes:
        """Downloads a blob and checks its hash."""
        data = self._request("GET", f"/v1/blobs/{cid}")
        if content_id(data) != cid:
            raise TransportError(f"blob {cid} does not match its bytes")
        return data

    def submit(self, spec: Union[Dict[str, Any], str, os.PathLike]) -> int:
        """Submits a job: a JobSpec dict whose module and inputs are content ids, or a job
        file (TOML or JSON) with local paths, which are uploaded. Returns the job id."""
        if not isinstance(spec, dict):
            spec = self._load_job_file(Path(spec))
        body = json.dumps(spec).encode()
        return int(self._json("POST", "/v1/jobs", body)["job_id"])

    def run(self, spec: Union[Dict[str, Any], str, os.PathLike], wait_ms: int = 60_000) -> Dict[str, Any]:
        """Submits a job and waits for it in the same request (``POST /v1/jobs?wait_ms=``):
        the domain answers when the job ends or after ``wait_ms`` (at most 60000). Returns
        the submission's answer (``job_id``, ...) with the job's status as ``job`` and, when
        it ended with at most 64 tasks, its ``results`` as :meth:`results` lists them.
        Accepts what :meth:`submit` accepts."""
        if not isinstance(spec, dict):
            spec = self._load_job_file(Path(spec))
        body = json.dumps(spec).encode()
        return self._json("POST", f"/v1/jobs?wait_ms={int(wait_ms)}", body)

    def quote(self, spec: Union[Dict[str, Any], str, os.PathLike]) -> Dict[str, Any]:
        """Prices a job now without submitting it: ``price_per_scu`` and ``max_cost`` (the
        escrow submission holds) in micro-credits, the demand factor, ``balance`` and
        ``affordable``. Accepts what :meth:`submit` accepts (a job file's files are
        uploaded, as content-addressed blobs)."""
        if not isinstance(spec, dict):
            spec = self._load_job_file(Path(spec))
        return self._json("POST", "/v1/quote", json.dumps(spec).encode())

    def account(self) -> Dict[str, Any]:
        """This key's balances in micro-credits: submitter, operator, author, stake."""
        return self._json("GET", "/v1/account")["balances"]

    def status(self, job_id: int, wait_ms: int = 0) -> Dict[str, Any]:
        """State and task counts: ``state``, ``tasks_total``, ``tasks_verified``, ...

        With ``wait_ms`` (at most 60000), the domain answers as soon as the job has ended, or
        after that many milliseconds if it has not (a long poll)."""
        if wait_ms:
            return self._json("GET", f"/v1/jobs/{job_id}?wait_ms={int(wait_ms)}")
        return self._json("GET", f"/v1/jobs/{job_id}")

    def tasks(self, job_id: int, offset: int = 0, limit: int = 1000) -> List[Dict[str, Any]]:
        """Tasks with their states."""
        return self._json("GET", f"/v1/jobs/{job_id}/tasks?offset={offset}&limit={limit}")["tasks"]

    def results(self, job_id: int) -> List[Dict[str, Any]]:
        """Each task's accepted result (``output_text`` inline for small UTF-8 outputs)."""
        return self._json("GET", f"/v1/jobs/{job_id}/results?limit=10000")["results"]

    def why(self, job_id: int) -> Dict[str, Any]:
        """Why the job's pending tasks are not running."""
        return self._json("GET", f"/v1/jobs/{job_id}/why")

    def cancel(self, job_id: int) -> Dict[str, Any]:
        """Cancels the job."""
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def nodes(self) -> List[Dict[str, Any]]:
        """The domain's nodes."""
        return self._json("GET", "/v1/nodes")["nodes"]

    def wait(self, job_id: int, progress: Optional[Callable[[Dict[str, Any]], None]] = None,
             poll: float = 1.0, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Waits until the job ends; calls ``progress`` with each status (about every ``poll``
        seconds while it runs); returns the last. The domain answers as soon as the job
        ends, so the wait adds no polling delay."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hold = poll if deadline is None else min(poll, max(0.0, deadline - time.monotonic()))
            # Held below the request timeout and the domain's 60 s limit.
            held_ms = min(60_000, int((self.timeout - 1) * 1000), int(hold * 1000))
            s = self.status(job_id, wait_ms=max(1, held_ms))
            if progress is not None:
                progress(s)
            if s["state"] in ("completed", "failed", "cancelled"):
                return s
            if deadline is not None and time.monotonic() > deadline:
                raise StardustError(f"job {job_id} did not end within {timeout} s")

    # -- job files ------------------------------------------------------------------------

    def _load_job_file(self, path: Path) -> Dict[str, Any]:
        try:
            text = path.read_text()
        except OSError as e:
            raise JobFileError(f"cannot read job file {path}: {e}") from e
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError as e:  # Python < 3.11
                raise JobFileError("TOML job files need Python 3.11+; pass a dict or a .json file") from e
            spec = tomllib.loads(text)
        base = path.parent

        def upload_path(p: Optional[str]) -> str:
            if p is None:
                return self.upload(b"")
            try:
                return self.upload((base / p).read_bytes())
            except OSError as e:
                raise JobFileError(f"cannot read {p}: {e}") from e

        if "module" not in spec:
            raise JobFileError(f"{path}: the job file needs module = \"FILE.wasm\"")
        spec["module"] = upload_path(spec["module"])
        spec["input"] = upload_path(spec.get("input"))
        for t in spec.get("tasks", []):
            if "input" in t:
                t["input"] = upload_path(t["input"])
        limits = spec.get("limits")
        if isinstance(limits, dict):
            for friendly, wire, units in (("memory", "memory_bytes", _SIZE_UNITS), ("max_output", "output_bytes", _SIZE_UNITS),
                                          ("timeout", "wall_ms", _TIME_UNITS)):
                if friendly in limits:
                    limits[wire] = _parse_unit(limits.pop(friendly), units, f"limits.{friendly}")
            defaults = {"fuel": 10 * 10**9, "memory_bytes": 256 << 20, "wall_ms": 60_000, "output_bytes": 16 << 20}
            for k, v in defaults.items():
                limits.setdefault(k, v)
        if isinstance(spec.get("seed"), int):
            spec["seed"] = str(spec["seed"])
        if "price_limit" in spec:
            spec["price_limit"] = credits_to_micro(spec["price_limit"], "price_limit")
        return spec
