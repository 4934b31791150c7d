"""The drafter side of the speculative-decoding Serve app (serve_apps/speculative.py).

Where the state lives and what a step costs:

- `DrafterSessions` holds one saved drafter (n-gram, CNN, LSTM or transformer) and, per generation,
  its drafter state (token list, LSTM states, KV cache) in a bounded LRU keyed by a session id. A
  speculative step sends only what changed since the last one (`keep` tokens still valid, then the new
  ones), never the sequence, and gets gamma drafts with their q rows back: one round trip per step
  (`DraftRequest` -> `DraftReply`, serve_apps/schemas.py).
- `DrafterDeployment` (one per configured drafter name) holds a `DrafterSessions`. The per-step round
  trip bypasses Serve's request path where it can: a target on the drafter's node talks to it over the
  loopback channel (serve_apps/loopback.py: ~0.05 ms against ~5 ms for a Serve handle call); a target
  elsewhere calls the deployment's `step` through its Serve handle.
- `RemoteDrafter` is the target-side proxy, a `Drafter`: start/push/rollback edit a local token list;
  `propose` ships the difference with the draft request.
"""

import copy
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from distilray.decoding.drafter_api import Draft
from distilray.decoding.sampling import Sampler, SamplingParams
from distilray.models.module_io import TokenListState
from distilray.serve_apps.loopback import LoopbackClient, LoopbackServer
from distilray.serve_apps.schemas import DrafterChannel, DraftReply, DraftRequest

STEP_TIMEOUT_S = 60.0  # one drafter round trip
StepFn = Callable[[DraftRequest], DraftReply]
EndFn = Callable[[str], None]


class DrafterSessions:
    """One drafter, many concurrent generations: per-session states (shallow copies sharing the weights)."""

    def __init__(
        self,
        name: str,
        folder: str,
        max_sessions: int = 256,
        num_threads: int = 1,
        device: str = "cpu",
        quantize: str = "none",
    ) -> None:
        from distilray.decoding.drafters import load_drafter
        from distilray.models.drafters import drafter_kind

        torch.set_num_threads(max(1, int(num_threads)))
        # the kind, never the folder: /v1/stats must not show the server's paths
        self._info = {"name": name, "kind": drafter_kind(folder), "quantize": quantize}
        self._template = load_drafter(folder, device, quantize=quantize)
        # build lazy tables (n-gram) and warm the kernels once, so session copies share them
        self._template.start([0])
        self._template.propose(1, Sampler(SamplingParams(max_new_tokens=1)))
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._max_sessions = max_sessions
        self._steps = self._evicted = 0
        self._seconds = 0.0
        self._lock = threading.Lock()  # socket connections and actor calls share the sessions
        self._server: LoopbackServer | None = None

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._info,
                "vocab_size": int(self._template.vocab_size),
                "sessions": len(self._sessions),
                "max_sessions": self._max_sessions,
                "evicted": self._evicted,
                "steps": self._steps,
                "mean_step_ms": 1000 * self._seconds / self._steps if self._steps else None,
            }

    def step(self, request: DraftRequest) -> DraftReply:
        """Sync the session (see DraftRequest), then draft request.gamma tokens."""
        with self._lock:
            start = time.perf_counter()
            state = self._sessions.get(request.session)
            if request.keep is None:
                state = state or copy.copy(self._template)  # start() rebinds every piece of per-sequence state
                state.start(request.tokens)
                self._sessions[request.session] = state
                while len(self._sessions) > self._max_sessions:
                    self._sessions.popitem(last=False)
                    self._evicted += 1
            elif state is None or request.keep > state.length():
                return DraftReply(drafts=[], unknown_session=True)
            else:
                if request.keep < state.length():
                    state.rollback(request.keep)
                state.push(request.tokens)
            self._sessions.move_to_end(request.session)
            draft = state.propose(request.gamma, Sampler(request.sampling()))
            # exact float32 rows: the acceptance test needs the very q sampled from
            q = None if draft.probs is None else draft.probs.numpy().astype(np.float32, copy=False)
            seconds = time.perf_counter() - start
            self._steps += 1
            self._seconds += seconds
            return DraftReply(drafts=draft.tokens, q=q, seconds=seconds)

    def end(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def open_channel(self) -> DrafterChannel:
        """Listen on 127.0.0.1 (once): where targets on this node reach the sessions."""
        if self._server is None:
            self._server = LoopbackServer(self._on_frame)
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return DrafterChannel(port=self._server.port, token=self._server.token, node_id=node_id)

    def _on_frame(self, header: dict[str, Any], blob: bytes) -> tuple[dict[str, Any], bytes]:
        """A loopback frame: {"end": session} or {"step": DraftRequest fields} -> reply header, q bytes."""
        if "end" in header:
            self.end(header["end"])
            return {}, b""
        reply = self.step(DraftRequest(**header["step"]))
        head = {"drafts": reply.drafts, "seconds": reply.seconds, "unknown_session": reply.unknown_session}
        return head, b"" if reply.q is None else np.ascontiguousarray(reply.q, np.float32).tobytes()


def socket_calls(port: int, token: str) -> tuple[StepFn, EndFn]:
    """(step, end) over a loopback connection to a `DrafterSessions` channel (one caller thread)."""
    client = LoopbackClient(port, token, STEP_TIMEOUT_S)

    def step(request: DraftRequest) -> DraftReply:
        head, blob = client.call({"step": asdict(request)})
        if "error" in head:
            raise RuntimeError(f"drafter step failed: {head['error']}")
        q = np.frombuffer(blob, dtype=np.float32).reshape(len(head["drafts"]), -1) if blob else None
        return DraftReply(drafts=head["drafts"], q=q, seconds=head["seconds"], unknown_session=head["unknown_session"])

    def end(session: str) -> None:
        client.call({"end": session})

    return step, end


def serve_calls(handle: Any) -> tuple[StepFn, EndFn]:
    """(step, end) over a DrafterDeployment handle (a target on another node): blocking step from a
    worker thread, fire-and-forget end."""

    def step(request: DraftRequest) -> DraftReply:
        return handle.step.remote(request).result(timeout_s=STEP_TIMEOUT_S)

    return step, lambda session: handle.end.remote(session)


# No access log: with the Serve transport this is called once per speculative step.
@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64, logging_config={"enable_access_log": False}
)
class DrafterDeployment:
    """A drafter behind Serve: its sessions, and the loopback channel targets on this node use."""

    def __init__(
        self,
        name: str,
        folder: str,
        max_sessions: int = 256,
        num_threads: int = 1,
        device: str = "cpu",
        quantize: str = "none",
    ) -> None:
        self._sessions = DrafterSessions(name, folder, max_sessions, num_threads, device, quantize)
        self._channel = self._sessions.open_channel()

    async def connect(self) -> DrafterChannel:
        """What a target needs, once: the loopback channel's port, token and node."""
        return self._channel

    async def info(self) -> dict[str, Any]:
        return self._sessions.info()

    def step(self, request: DraftRequest) -> DraftReply:  # sync: Serve runs it in its thread pool
        return self._sessions.step(request)

    def end(self, session: str) -> None:
        self._sessions.end(session)


class RemoteDrafter(TokenListState):
    """A `Drafter` over a remote `DrafterSessions` session: one round trip per block.

    `step` and `end` are the calls to the remote (socket_calls, serve_calls, or in-process methods in
    tests); `reconnect`, when given, returns fresh ones after the connection broke (a replaced replica).
    start/push/rollback edit a local token list; `propose` ships the difference with the draft request.
    """

    needs_target_hidden = False

    def __init__(
        self, step: StepFn, end: EndFn, vocab_size: int, reconnect: Callable[[], tuple[StepFn, EndFn]] | None = None
    ) -> None:
        self.vocab_size = vocab_size
        self.session = uuid.uuid4().hex
        self._step, self._end, self._reconnect = step, end, reconnect
        self._tokens: list[int] = []
        self._synced = 0  # leading tokens the remote state is known to share with _tokens
        self._started = False
        self.round_trips = self.restarts = 0
        self.round_trip_seconds = self.drafter_seconds = 0.0

    def start(self, prefix: list[int]) -> None:
        super().start(prefix)
        self._synced, self._started = 0, False

    def rollback(self, length: int) -> None:
        super().rollback(length)
        self._synced = min(self._synced, length)

    def propose(self, gamma: int, sampler: Sampler, target_hidden: torch.Tensor | None = None) -> Draft:
        """gamma drafts and, when sampling, their warped q rows, sampled remotely from exactly those rows."""
        if gamma == 0:  # the budget's last token: nothing to draft, no round trip
            return Draft([])
        # the drafter samples with its own generator, seeded from ours: reproducible per request seed
        seed = sampler.child_seed()
        try:
            out = self._call(gamma, sampler, seed, restart=not self._started)
        except (ray.exceptions.RayActorError, ConnectionError, OSError):  # the drafter replica went away
            if self._reconnect is None:
                raise
            self._step, self._end = self._reconnect()
            out = DraftReply(drafts=[], unknown_session=True)
        if out.unknown_session:  # evicted, or a new drafter process: resend the whole state
            self.restarts += 1
            out = self._call(gamma, sampler, seed, restart=True)
        drafts = [int(d) for d in out.drafts]
        # greedy drafts come back without rows: a point mass is the one-hot q they were drawn from
        probs = None if out.q is None else torch.from_numpy(np.array(out.q, dtype=np.float32))
        self._tokens.extend(drafts)
        self._synced, self._started = len(self._tokens), True
        return Draft(drafts, probs)

    def _call(self, gamma: int, sampler: Sampler, seed: int, restart: bool) -> DraftReply:
        keep, tokens = (None, self._tokens) if restart else (self._synced, self._tokens[self._synced :])
        params = sampler.params
        request = DraftRequest(
            session=self.session,
            keep=keep,
            tokens=list(tokens),
            gamma=gamma,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
        )
        start = time.perf_counter()
        out = self._step(request)
        self.round_trips += 1
        self.round_trip_seconds += time.perf_counter() - start
        self.drafter_seconds += out.seconds
        return out

    def close(self) -> None:
        if self._started:  # the remote's LRU bounds what a lost call would leave behind
            try:
                self._end(self.session)
            except (ConnectionError, OSError):
                pass
