"""The command line's face: quiet by default (progress, warnings, result), everything with verbosity on."""

import json
import os
import re
import subprocess
import sys
import textwrap

from distilray import console


def test_ray_core_lines_are_recognised():
    line = (
        b"[2026-11-30 20:23:54,661 E 7743 7743] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        b"has constructor arguments in the object store and max_restarts > 0."
    )
    assert console.RAY_CORE_LINE.match(line)
    assert console.RAY_CORE_LINE.match(b"[2026-11-30 20:23:54,661 I 1 2] logging.cc:303: Set ray log level")
    assert not console.RAY_CORE_LINE.match(b"[2026-11-30 20:23:54,661 F 1 2] core_worker.cc:1: check failed")
    assert not console.RAY_CORE_LINE.match(b"[extract] 64 windows in 4 shards")


def test_ray_init_kwargs_follow_verbosity(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    quiet, loud = console.ray_init_kwargs(False), console.ray_init_kwargs(True)
    assert quiet["log_to_driver"] is False and loud["log_to_driver"] is True
    assert quiet["logging_level"] > loud["logging_level"]
    assert "runtime_env" not in quiet  # local workers inherit the environment
    # on a cluster the verbosity travels in the runtime_env, unless the job's own already names it
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert console.ray_init_kwargs(True)["runtime_env"]["env_vars"][console.VERBOSE_ENV] == "1"
    job = {"runtime_env": {"env_vars": {console.VERBOSE_ENV: "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "runtime_env" not in console.ray_init_kwargs(False)


def test_line_progress_prints_every_tenth(capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with console.progress(20, "stage", unit="shards") as bar:
        for _ in range(20):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "stage: 0/20 shards (0%)" and lines[-1] == "stage: 20/20 shards (100%)"
    assert len(lines) == 11  # 0%, 10%, ..., 100%
    with console.progress(0, "count", unit="blocks") as bar:
        bar.update(3)
    assert capsys.readouterr().err.splitlines()[-1] == "count: 3/0 blocks"


def test_stderr_filter_drops_ray_core_lines_and_keeps_the_rest():
    code = textwrap.dedent("""
        import os, sys
        from distilray import console
        console.configure_output(False)
        os.write(2, b"[2026-11-30 20:23:54,661 E 7743 7743] core_worker.cc:2465: noise\\n")
        os.write(2, b"a native library's own line\\n")
        os.write(2, b"[2026-11-30 20:23:54,661 F 7743 7743] core_worker.cc:1: fatal stays\\n")
        print("python stderr", file=sys.stderr)
        raise SystemExit("an error a user must see")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "noise" not in r.stderr
    for kept in ("a native library's own line", "fatal stays", "python stderr", "an error a user must see"):
        assert kept in r.stderr


def test_a_command_is_quiet_by_default_and_verbose_on_request(small_tokenizer, tmp_path):
    _, tok_dir = small_tokenizer
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat, the dog on the log." for i in range(60)))

    def fit_ngram(out: str, **env):
        args = [
            sys.executable,
            "-m",
            "distilray.cli",
            "fit-ngram",
            f"tokenizer={tok_dir}",
            "n=2",
            "num_blocks=2",
            f"corpus.dataset={text}",
            f"output_dir={tmp_path / out}",
        ]
        environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.VERBOSE_ENV, "CI")}
        return subprocess.run(args, capture_output=True, text=True, timeout=180, env={**environ, **env})

    quiet = fit_ngram("quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["n"] == 2  # stdout holds the result and nothing else
    for internal in ("core_worker", "(pid=", " INFO ", "Running Dataset", "Started a local Ray instance"):
        assert internal not in quiet.stdout + quiet.stderr, internal
    assert re.search(r"^fit-ngram: (\d+)/\1 blocks \(100%\)$", quiet.stderr, re.M)  # its one progress line set
    assert "logs: /" in quiet.stderr  # where the workers' logs went

    loud = fit_ngram("loud", DISTILRAY_VERBOSE="1")
    assert loud.returncode == 0, loud.stderr
    assert "Started a local Ray instance" in loud.stderr and "Starting execution of Dataset" in loud.stderr
    assert len((loud.stdout + loud.stderr).splitlines()) > len((quiet.stdout + quiet.stderr).splitlines())
