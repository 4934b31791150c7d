"""What a command prints: by default one progress bar per stage, the warnings that matter and the
result; `--verbose` brings back everything Ray and its workers say.

Nothing is lost when quiet: workers' stdout/stderr and every Ray process's own logs stay in the Ray
session's log folder (`log_folder()`), which a command names when it ends.

Where console lines come from on a Ray 2.60 driver, and what quiets each one:
- the driver's Python loggers `ray`, `ray.train`, `ray.serve`: their levels, set here and through
  `ray.init(logging_level=...)`; `ray.data` has its own console handler (lowered by `ensure_ray`,
  its file handler keeps everything) and its own progress output (one tqdm bar per operator on a
  terminal, a status dump every 10 s elsewhere), turned off there: stages show their own `progress`;
- workers' stdout/stderr, forwarded with a `(... pid=N)` prefix: `ray.init(log_to_driver=False)`.
  That also carries the C++ errors of actors, e.g. Ray Train's controller saying that its
  `PreemptionWatcher` "has constructor arguments in the object store";
- the C++ core worker inside the driver itself, which writes its ERROR lines to the process's
  stderr (e.g. that same line for every Ray Data actor pool). Its only switch, RAY_BACKEND_LOG_LEVEL,
  would also blank the log files of every Ray process started from here (and prints a line of its
  own), so instead C-level writes to this process's stderr pass through a filter that drops Ray's
  C++ log lines below FATAL; they are in python-core-driver-*.log all the same.

This module imports no Ray: it is the CLI's face, and Ray-specific steps live in
`actors/cluster.py`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

from tqdm import tqdm

VERBOSE_ENV = "DISTILRAY_VERBOSE"  # "1": workers and Ray say everything; set by configure_output

# Python loggers of Ray's libraries that speak on the driver
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune")

# Set before Ray, transformers or datasets are imported (and inherited by local Ray workers):
# their download/loading bars ("Loading weights", "Writing model shards") are noise beside a stage's bar.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# A Ray C++ log line: "[2026-11-30 20:23:54,661 E 7743 7743] core_worker.cc:2465: ..."; levels D/I/W/E
# (F, fatal, always passes)
RAY_CORE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] [\w./-]+\.(?:cc|h):\d+: ")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def configure_output(verbose: bool) -> None:
    """Call once, first thing in the CLI, before Ray or any model library is imported.

    DISTILRAY_VERBOSE=1 in the environment makes it verbose too."""
    verbose = verbose or is_verbose()
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    _configure_distilray_logger(verbose)
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _StderrFilter.install()


def ray_init_kwargs(verbose: bool) -> dict:
    """Keyword arguments for `ray.init`: quiet unless verbose, and the verbosity passed on to workers.

    A local Ray's workers inherit this process's environment (DISTILRAY_VERBOSE included); a cluster's
    get it through the job's runtime_env (a runtime_env costs a local run about a second of worker setup)."""
    kwargs: dict = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    # a job's runtime_env (`ray job submit --runtime-env`) naming the same variable would conflict
    if os.environ.get("RAY_ADDRESS") and not _job_sets_env(VERBOSE_ENV):
        kwargs["runtime_env"] = {"env_vars": {VERBOSE_ENV: "1" if verbose else "0"}}
    return kwargs


def log_folder() -> str | None:
    """The Ray session's log folder (workers' output included), or None when Ray is not running here."""
    ray = sys.modules.get("ray")
    try:
        if ray is None or not ray.is_initialized():
            return None
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # Ray Client, or a Ray without this private path: no folder to name
        return None


def quiet_worker() -> None:
    """Call first in code that runs in a Ray worker (a Ray Train loop, a Ray Data actor's __init__):
    distilray's loggers at WARNING (INFO with DISTILRAY_VERBOSE=1), and Ray Train's one INFO line per
    `ray.train.report` silenced: progress bars on the driver say enough."""
    verbose = is_verbose()
    _configure_distilray_logger(verbose)
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    hf_logging = sys.modules.get("transformers.utils.logging")  # imported before the variable was set
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
    # Ray Train V2 names that module's logger by its file path; it is imported in any Train worker
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def progress(total: int, desc: str, unit: str = "it", initial: int = 0):
    """A progress bar for one stage: tqdm on a terminal; one plain line per 10% in CI or a log file.

    Use as a context manager, calling `update(n)`; a `total` of 0 counts without a total."""
    if sys.stderr.isatty() and not os.environ.get("CI"):
        return tqdm(
            total=total or None, desc=desc, unit=unit, initial=initial, mininterval=1.0, leave=True, dynamic_ncols=True
        )
    return _LineProgress(total, desc, unit, initial)


class _LineProgress:
    """tqdm's `update`/`close` for a log file: `desc: 3/10 unit (30%)` each time another 10% is done."""

    def __init__(self, total: int, desc: str, unit: str, initial: int) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._shown = -1  # tenths already printed

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = 10 * self.n // self.total if self.total > 0 else 0
        if tenth > self._shown:
            self._shown = tenth
            percent = f" ({100 * self.n // self.total}%)" if self.total > 0 else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}{percent}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.total <= 0 or 10 * self.n // self.total < 10:  # the last state, unless 100% was printed
            self._shown = -1
            self.update(0)

    def __enter__(self) -> "_LineProgress":
        self._shown = -1
        self.update(0)  # the stage announces itself (and, resumed, where it stands)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _configure_distilray_logger(verbose: bool) -> None:
    """distilray's loggers print their message alone on stderr: INFO and up when verbose, else WARNING."""
    logger = logging.getLogger("distilray")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(getattr(h, "_distilray", False) for h in logger.handlers):
        handler = logging.StreamHandler()  # writes to sys.stderr as it is at each message
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._distilray = True
        logger.addHandler(handler)
        logger.propagate = False  # a root handler (Ray's, a notebook's) would print each line twice


def _job_sets_env(name: str) -> bool:
    """Whether the Ray job this driver runs in (`ray job submit --runtime-env`) already sets `name`."""
    import json

    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return name in (json.loads(job).get("runtime_env") or {}).get("env_vars", {}) if job else False
    except (ValueError, AttributeError):
        return False


class _StderrFilter:
    """C-level writes to this process's stderr (fd 2) go through a pipe; a thread copies them to the real
    stderr, leaving out Ray's C++ log lines below FATAL. Python's own sys.stderr (tracebacks, logging,
    progress bars) is rebound straight to the real stderr, so it never waits on the thread."""

    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        try:
            terminal = os.dup(2)
            read_end, write_end = os.pipe()
        except OSError:  # no stderr to speak of: nothing to filter
            return
        cls._installed = True
        stream = sys.stderr
        sys.stderr = open(
            terminal,
            "w",
            buffering=1,
            encoding=getattr(stream, "encoding", None) or "utf-8",
            errors="backslashreplace",
            closefd=False,
        )
        os.dup2(write_end, 2)
        os.close(write_end)
        pump = threading.Thread(target=cls._pump, args=(read_end, terminal), name="distilray-stderr", daemon=True)
        pump.start()
        atexit.register(cls._restore, terminal, pump)  # registered before ray.init: runs after Ray's shutdown

    @staticmethod
    def _pump(read_end: int, terminal: int) -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not RAY_CORE_LINE.match(line))
            if pending and not pending.startswith(b"["):  # a partial line that cannot be Ray's: now
                kept, pending = kept + pending, b""
            _write_all(terminal, kept)
        if not RAY_CORE_LINE.match(pending):
            _write_all(terminal, pending)

    @staticmethod
    def _restore(terminal: int, pump: threading.Thread) -> None:
        os.dup2(terminal, 2)  # closes the pipe's write end: the thread reads what is left, then ends
        pump.join(timeout=2.0)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`; a closed stderr (`| head`) drops it, and the pump keeps draining the pipe, or
    every later write to stderr would block once the pipe is full."""
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass
