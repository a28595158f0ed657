"""The owner's resident process: the node side (model, tokenizer, the owner's data and verifiers) loaded once
and kept across rounds, so that a deployed round costs what an in-process round costs.

flwr 1.42's SuperNode starts a new ClientApp process for every message; loading torch and the model there
costs every round again. ``fgrpo owner serve`` (one per SuperNode machine, beside ``flower-supernode``, from
the same run config and node config) loads the node side once and answers the ClientApp's requests over a
Unix socket that only its user can open (mode 0600). The ClientApp only adapts: with ``owner-socket`` in its
node config it passes the message on and returns the answer, and never imports torch.

    ClientApp   --(header: kind, run id, model, config, node config; the message's RecordDict)-->   resident
    ClientApp   <--(header: ok or the refusal; the reply's RecordDict)--                                resident

A frame is ``FRAME`` (two lengths), a JSON header and Flower's protobuf of a RecordDict (no pickle). The
resident serves one run: the first message binds it to that run id, and it refuses a message of another
run, base model, node config or config with a one-line error that names the mismatch. It writes
``<socket>.status.json`` (its pid, run, model loads, messages served) after every request.

Faults: a ClientApp that cannot reach the socket loads the node side itself, with a warning (today's path);
a resident that dies or runs past the client timeout mid-round makes that round's update fail (the server
leaves the owner out, as any failed client). The owner's log and completions are appended by whole records.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import time
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fgrpo.flower.run_config import config_hash, node_run_config

SOCKET_KEY = "owner-socket"  # the node config key that names the resident's socket
FRAME = struct.Struct("!IQ")  # header bytes, payload bytes
KINDS = ("train", "evaluate")
log = logging.getLogger("fgrpo.owner")


class Unreachable(ConnectionError):
    """No resident process answers at the socket (the ClientApp falls back to loading the model itself)."""


class OwnerFailed(RuntimeError):
    """The resident process refused the message, died or timed out mid-round (the round's update fails)."""


def to_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def send_frame(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(FRAME.pack(len(head), len(payload)) + head + payload)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError(f"the connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def receive_frame(sock: socket.socket) -> tuple[dict, bytes]:
    head_size, payload_size = FRAME.unpack(_exactly(sock, FRAME.size))
    return json.loads(_exactly(sock, head_size)), _exactly(sock, payload_size)


def identity(run_config: dict, node_config: dict) -> dict:
    """What must match between a message and the resident: base model, node config and the whole config."""
    cfg = node_run_config(run_config, node_config, checked=False)  # the resident checked its own at start
    return {"model": cfg.model, "node": {k: str(v) for k, v in sorted(node_config.items()) if k != SOCKET_KEY},
            "config_hash": config_hash(cfg), "config": {k: str(v) for k, v in cfg.to_dict().items()}}


def refusal(own: dict, run_id: int | None, header: dict) -> str | None:
    """Why the resident refuses a message (one line naming the mismatch), or None."""
    if run_id is not None and header["run_id"] != run_id:
        return (f"the message is of run {header['run_id']}, this owner process serves run {run_id} "
                "(one process serves one run: start a new one for a new run)")
    if header["model"] != own["model"]:
        return f"the message's base model is {header['model']!r}, this owner process has {own['model']!r}"
    if header["node"] != own["node"]:
        return f"the message's node config is {header['node']}, this owner process was started with {own['node']}"
    if header["config_hash"] != own["config_hash"]:
        keys = sorted(k for k in own["config"] if header["config"].get(k) != own["config"][k])
        shown = ", ".join(f"{k} = {header['config'].get(k)} (here {own['config'][k]})" for k in keys[:3])
        return (f"the message's config hash {header['config_hash']} differs from this owner process's "
                f"{own['config_hash']}: {shown}{' ...' if len(keys) > 3 else ''}")
    return None


def ask(path: str, header: dict, content: RecordDict | None, timeout: float | None) -> RecordDict | dict:
    """Send a request to the resident at ``path`` and return its answer: the reply's RecordDict (train,
    evaluate) or the header (status). Raises Unreachable when nothing listens there, OwnerFailed when it
    refuses, dies or does not answer within ``timeout`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as err:
            raise Unreachable(f"no owner process answers at {path} ({err.strerror or err})") from err
        try:
            send_frame(sock, header, b"" if content is None else to_bytes(content))
            answer, payload = receive_frame(sock)
        except (OSError, ConnectionError) as err:  # socket.timeout is an OSError
            raise OwnerFailed(f"the owner process at {path} did not answer: {err or type(err).__name__}") from err
    if "error" in answer:
        raise OwnerFailed(f"the owner process at {path} refused the message: {answer['error']}")
    return from_bytes(payload) if header["kind"] in KINDS else answer


def request(kind: str, run_id: int, run_config: dict, node_config: dict, received: float) -> dict:
    """The header of a ClientApp's request for one message."""
    return {"kind": kind, "run_id": run_id, "received": received, **identity(run_config, node_config)}


class ResidentOwner:
    """The node side of one owner, loaded once, answering the ClientApp's requests one at a time."""

    def __init__(self, path: Path, run_config: dict, node_config: dict):
        self.path, self.run_config, self.node_config = path, run_config, node_config
        self.own = identity(run_config, node_config)
        self.run_id: int | None = None
        self.served = {"train": 0, "evaluate": 0, "refused": 0, "failed": 0}

    def load(self) -> None:
        """Build the node side (base model, tokenizer, data, verifiers) before the first message."""
        from fgrpo.flower import node

        t0 = time.perf_counter()
        node.owner(self.run_config, self.node_config)
        log.info("owner loaded in %.1f s (model %s, config %s)", time.perf_counter() - t0, self.own["model"],
                 self.own["config_hash"])

    def status(self) -> dict:
        from fgrpo.flower import node

        return {"pid": os.getpid(), "run_id": self.run_id, "model_loads": node.load_count(), **self.served}

    def answer(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        """(the answer's header, its payload) for one request."""
        from fgrpo.flower import node

        if header.get("kind") == "status":
            return self.status(), b""
        problem = refusal(self.own, self.run_id, header) if header.get("kind") in KINDS else (
            f"unknown request kind {header.get('kind')!r}")
        if problem:
            self.served["refused"] += 1
            log.warning("refused: %s", problem)
            return {"error": problem}, b""
        self.run_id = header["run_id"]
        content = from_bytes(payload)
        log.info("%s message of run %s%s", header["kind"], self.run_id,
                 f", round {content['round']['server-round']}" if header["kind"] == "train" else "")
        try:
            reply = (node.train_reply(content, self.run_config, self.node_config, header["received"])
                     if header["kind"] == "train" else node.evaluate_reply(content, self.run_config, self.node_config))
        except Exception as err:  # the round's update fails; the process serves the next round
            self.served["failed"] += 1
            log.exception("the %s message failed", header["kind"])
            return {"error": f"{header['kind']} failed: {type(err).__name__}: {err}"}, b""
        self.served[header["kind"]] += 1
        return {"ok": True}, to_bytes(reply)

    def write_status(self) -> None:
        target = Path(f"{self.path}.status.json")
        part = target.with_name(target.name + ".part")
        part.write_text(json.dumps(self.status()))
        part.replace(target)  # atomic: a reader sees the old status or the new one

    def serve_forever(self) -> None:
        with listening_socket(self.path) as listener:
            self.write_status()
            log.info("serving at %s", self.path)
            while True:
                conn, _ = listener.accept()
                with conn:
                    try:
                        header, payload = receive_frame(conn)
                        send_frame(conn, *self.answer(header, payload))
                    except (OSError, ConnectionError) as err:  # the ClientApp went away (e.g. its timeout)
                        log.warning("a request was lost: %s", err)
                self.write_status()


def listening_socket(path: Path) -> socket.socket:
    """A Unix socket at ``path`` that only this user can connect to (mode 0600, made so before it listens). A
    stale socket file of a dead process is replaced; a live one is an error."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path}: exists and is not a socket")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))
            raise OSError(f"{path}: another owner process is serving there")
        except ConnectionRefusedError:
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created rw for its user only
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock


def parse_settings(text: str, what: str) -> dict:
    """A ``key=value key2="text"`` string as Flower parses ``--run-config`` and ``--node-config``."""
    from click import ClickException
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text]) if text.strip() else {}
    except ClickException as err:
        from fgrpo.config import ConfigError

        raise ConfigError(f"{what} = {text!r}: {err.message}") from err


def serve(path: str, run_config: str, node_config: str) -> None:
    """``fgrpo owner serve``: load the owner's node side, then answer its ClientApp until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fgrpo owner: %(message)s")
    owner = ResidentOwner(Path(path), parse_settings(run_config, "--run-config"),
                          parse_settings(node_config, "--node-config"))
    owner.load()
    owner.serve_forever()
