"""The drafter side of the speculative-decoding Serve app (serve_apps/speculative.py).

Where the state lives and what a step costs:

- `DrafterSessions` holds one saved drafter (n-gram, CNN, LSTM or transformer) and, per generation,
  its drafter state (token list, LSTM states, KV cache) in a bounded LRU keyed by a session id. A
  speculative step sends only what changed since the last one (`keep` tokens still valid, then the new
  ones), never the sequence, and gets g drafts with their q rows back: one round trip per step.
- `DrafterDeployment` (one per configured drafter name) holds a `DrafterSessions`. The per-step round
  trip bypasses Serve's request path where it can: measured on this 2-core machine, a Serve handle call
  costs ~5 ms, a plain actor call ~1 ms, a loopback socket ~0.05 ms, against a few ms for a small
  target's forward pass. So a target on the drafter's node talks to it over a persistent 127.0.0.1
  socket the replica listens on (token-authenticated, JSON header + raw float32 rows, no pickle); a
  target elsewhere calls the deployment's `step` through its Serve handle.
- `RemoteDrafter` is the target-side proxy: the `Drafter` protocol plus `propose`. start/push/rollback
  edit a local token list; `propose` ships the difference with the draft request.
"""

import hmac
import json
import secrets
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from distilray.decoding.speculative import propose
from distilray.errors import DistilrayError

STEP_TIMEOUT_S = 60.0  # one drafter round trip
MAX_FRAME_BYTES = 256 * 1024 * 1024  # q rows of g drafts over a large vocabulary fit well inside
StepFn = Callable[..., dict[str, Any]]  # (session, keep, tokens, g, temperature, top_p, draft_seed) -> reply
EndFn = Callable[[str], None]


class DrafterSessions:
    """One drafter, many concurrent generations: per-session states (shallow copies sharing the weights)."""

    def __init__(self, name: str, folder: str, max_sessions: int = 256, num_threads: int = 1,
                 device: str = "cpu") -> None:
        from distilray.models.drafters import drafter_kind, load_drafter

        torch.set_num_threads(max(1, int(num_threads)))
        self._info = {"name": name, "folder": folder, "kind": drafter_kind(folder)}
        self._template = load_drafter(folder, device)
        # build lazy tables (n-gram) and warm the kernels once, so session copies share them
        self._template.start([0])
        self._template.next_logits()
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._max_sessions = max_sessions
        self._steps = self._evicted = 0
        self._seconds = 0.0
        self._lock = threading.Lock()  # socket connections and actor calls share the sessions
        self._channel: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {**self._info, "vocab_size": int(self._template.vocab_size), "sessions": len(self._sessions),
                    "max_sessions": self._max_sessions, "evicted": self._evicted, "steps": self._steps,
                    "mean_step_ms": 1000 * self._seconds / self._steps if self._steps else None}

    def step(self, session: str, keep: int | None, tokens: list[int], g: int, temperature: float,
             top_p: float, draft_seed: int) -> dict[str, Any]:
        """Sync the session (keep None: start it on `tokens`; else roll back to `keep`, push `tokens`),
        then draft g tokens: {"drafts": [g ints], "q": (g, V) float32 when sampling, "seconds"}, or
        {"unknown_session": True} when this drafter does not hold the session (evicted, restarted)."""
        with self._lock:
            start = time.perf_counter()
            state = self._sessions.get(session)
            if keep is None:
                state = state or self._new_state()
                state.start(tokens)
                self._sessions[session] = state
                while len(self._sessions) > self._max_sessions:
                    self._sessions.popitem(last=False)
                    self._evicted += 1
            elif state is None or keep > state.length():
                return {"unknown_session": True}
            else:
                if keep < state.length():
                    state.rollback(keep)
                state.push(tokens)
            self._sessions.move_to_end(session)
            generator = None if temperature == 0 else torch.Generator().manual_seed(draft_seed)
            drafts, q = propose(state, g, temperature, top_p, generator)
            out: dict[str, Any] = {"drafts": drafts}
            if generator is not None:  # exact float32 rows: the acceptance test needs the very q sampled from
                out["q"] = torch.stack(q).numpy()
            self._steps += 1
            out["seconds"] = time.perf_counter() - start
            self._seconds += out["seconds"]
            return out

    def end(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def _new_state(self):
        import copy

        return copy.copy(self._template)  # start() rebinds every piece of per-sequence state

    # -- loopback channel ----------------------------------------------------------------------------

    def open_channel(self) -> dict[str, Any]:
        """Listen on 127.0.0.1 (once): {"port", "token", "node_id"} for targets on this node."""
        if self._channel is None:
            listener = socket.create_server(("127.0.0.1", 0))
            self._channel = {"port": listener.getsockname()[1], "token": secrets.token_hex(16),
                             "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="drafter-accept").start()
        return dict(self._channel)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # e.g. out of file descriptors: new targets use Serve handle calls meanwhile
                time.sleep(0.1)
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                hello, _ = recv_frame(conn, max_bytes=4096)  # nothing big before the token is checked
                token = hello.get("token") if isinstance(hello, dict) else None
                if not hmac.compare_digest(str(token), self._channel["token"]):
                    return
                while True:
                    request, _ = recv_frame(conn)
                    try:
                        if "end" in request:
                            self.end(request["end"])
                            send_frame(conn, {})
                            continue
                        out = self.step(*request["step"])
                    except Exception as exc:  # this request fails; the connection and the drafter go on
                        send_frame(conn, {"error": f"{type(exc).__name__}: {exc}"})
                        continue
                    q = out.pop("q", None)
                    send_frame(conn, out, b"" if q is None else np.ascontiguousarray(q, np.float32).tobytes())
            except (ConnectionError, OSError, ValueError):
                return  # the target went away (or spoke nonsense): drop the connection


def send_frame(sock: socket.socket, header: dict[str, Any], blob: bytes = b"") -> None:
    """One message: u32 total length, u32 header length, JSON header, raw bytes."""
    head = json.dumps(header).encode()
    sock.sendall(struct.pack("!II", 4 + len(head) + len(blob), len(head)) + head + blob)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> tuple[dict[str, Any], bytes]:
    total, head_len = struct.unpack("!II", _recv_exact(sock, 8))
    if not 4 + head_len <= total <= max_bytes:
        raise ValueError(f"malformed frame ({total} bytes, header {head_len})")
    body = _recv_exact(sock, total - 4)
    return json.loads(body[:head_len]), body[head_len:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("drafter connection closed")
        got += k
    return bytes(buf)


def socket_calls(port: int, token: str) -> tuple[StepFn, EndFn]:
    """(step, end) over a loopback connection to a `DrafterSessions` channel (one caller thread)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_frame(sock, {"token": token})

    def step(*args: Any) -> dict[str, Any]:
        send_frame(sock, {"step": list(args)})
        out, blob = recv_frame(sock)
        if "error" in out:
            raise RuntimeError(f"drafter step failed: {out['error']}")
        if blob:
            out["q"] = np.frombuffer(blob, dtype=np.float32).reshape(len(out["drafts"]), -1)
        return out

    def end(session: str) -> None:
        send_frame(sock, {"end": session})
        recv_frame(sock)

    return step, end


def serve_calls(handle: Any) -> tuple[StepFn, EndFn]:
    """(step, end) over a DrafterDeployment handle (a target on another node): blocking step from a
    worker thread, fire-and-forget end."""

    def step(*args: Any) -> dict[str, Any]:
        return handle.step.remote(*args).result(timeout_s=STEP_TIMEOUT_S)

    return step, lambda session: handle.end.remote(session)


# No access log: with the Serve transport this is called once per speculative step.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})
class DrafterDeployment:
    """A drafter behind Serve: its sessions, and the loopback channel targets on this node use."""

    def __init__(self, name: str, folder: str, max_sessions: int = 256, num_threads: int = 1,
                 device: str = "cpu") -> None:
        self._sessions = DrafterSessions(name, folder, max_sessions, num_threads, device)
        self._channel = self._sessions.open_channel()

    async def connect(self) -> dict[str, Any]:
        """What a target needs, once: {"port", "token", "node_id"} of the loopback channel."""
        return dict(self._channel)

    async def info(self) -> dict[str, Any]:
        return self._sessions.info()

    def step(self, *args: Any) -> dict[str, Any]:  # sync: Serve runs it in its thread pool
        return self._sessions.step(*args)

    def end(self, session: str) -> None:
        self._sessions.end(session)


class RemoteDrafter:
    """The `Drafter` protocol plus `propose` over a remote `DrafterSessions` session.

    `step` and `end` are the calls to the remote (socket_calls, serve_calls, or in-process methods in
    tests); `reconnect`, when given, returns fresh ones after the connection broke (a replaced replica).
    """

    def __init__(self, step: StepFn, end: EndFn, vocab_size: int,
                 reconnect: Callable[[], tuple[StepFn, EndFn]] | None = None) -> None:
        self.vocab_size = vocab_size
        self.session = uuid.uuid4().hex
        self._step, self._end, self._reconnect = step, end, reconnect
        self._tokens: list[int] = []
        self._synced = 0  # leading tokens the remote state is known to share with _tokens
        self._started = False
        self.round_trips = self.restarts = 0
        self.round_trip_seconds = self.drafter_seconds = 0.0

    def start(self, prefix: list[int]) -> None:
        if not prefix:
            raise DistilrayError("a drafter needs a non-empty prefix")
        self._tokens, self._synced, self._started = [int(t) for t in prefix], 0, False

    def push(self, tokens: list[int]) -> None:
        self._tokens.extend(int(t) for t in tokens)

    def rollback(self, length: int) -> None:
        if not 1 <= length <= len(self._tokens):
            raise DistilrayError(f"cannot roll a drafter of {len(self._tokens)} tokens back to {length}")
        del self._tokens[length:]
        self._synced = min(self._synced, length)

    def length(self) -> int:
        return len(self._tokens)

    def next_logits(self) -> torch.Tensor:
        raise DistilrayError("a remote drafter drafts whole blocks through propose()")

    def propose(self, g: int, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """g drafts and their warped q rows (V,), sampled remotely from exactly those rows."""
        if g == 0:  # the budget's last token: nothing to draft, no round trip
            return [], []
        # the drafter samples with its own generator, seeded from ours: reproducible per request seed
        seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        try:
            out = self._call(g, temperature, top_p, seed, restart=not self._started)
        except (ray.exceptions.RayActorError, ConnectionError, OSError):  # the drafter replica went away
            if self._reconnect is None:
                raise
            self._step, self._end = self._reconnect()
            out = {"unknown_session": True}
        if out.get("unknown_session"):  # evicted, or a new drafter process: resend the whole state
            self.restarts += 1
            out = self._call(g, temperature, top_p, seed, restart=True)
        drafts = [int(d) for d in out["drafts"]]
        if temperature == 0:  # greedy: the one-hot q rows are rebuilt here instead of shipped
            q = [torch.zeros(self.vocab_size).index_fill_(0, torch.tensor([d]), 1.0) for d in drafts]
        else:
            q = list(torch.from_numpy(np.array(out["q"], dtype=np.float32)))
        self._tokens.extend(drafts)
        self._synced, self._started = len(self._tokens), True
        return drafts, q

    def _call(self, g: int, temperature: float, top_p: float, seed: int, restart: bool) -> dict[str, Any]:
        keep, tokens = (None, self._tokens) if restart else (self._synced, self._tokens[self._synced:])
        start = time.perf_counter()
        out = self._step(self.session, keep, tokens, g, temperature, top_p, seed)
        self.round_trips += 1
        self.round_trip_seconds += time.perf_counter() - start
        self.drafter_seconds += out.get("seconds", 0.0)
        return out

    def close(self) -> None:
        if self._started:  # the remote's LRU bounds what a lost call would leave behind
            try:
                self._end(self.session)
            except (ConnectionError, OSError):
                pass
