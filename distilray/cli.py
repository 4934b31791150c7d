"""`distilray <command> [--config FILE] [key=value ...] [--some-key VALUE ...] [--verbose]`

Every command (distilray.commands) builds its frozen config (YAML file, then overrides), then calls
one function and prints its result. A flag `--output-dir DIR` is the same as `output_dir=DIR`; keys
of a section need no prefix where only one section has them (`--dataset NAME` is
`corpus.dataset=NAME`, `lr=3e-4` is `optim.lr=3e-4`). Expected errors print one line and exit with
status 2. By default a command shows its progress bars, the warnings that matter and its result;
`--verbose` shows every log line (workers' too).
"""

from __future__ import annotations

import argparse
import os
import sys

from distilray.commands import BENCHMARKS, COMMANDS, Command, find
from distilray.config_loading import all_keys, load_config, resolve_key
from distilray.errors import DistilrayError

FLAG_ALIASES = {"json": "json_out"}


def flags_to_overrides(cls: type, extra: list[str]) -> list[str]:
    """Turn `--output-dir D`, `--dataset=X` and bare `key=value` items into override strings (full keys)."""
    overrides: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            if not eq:
                if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                    raise DistilrayError(f"flag --{name} needs a value")
                value, i = extra[i + 1], i + 1
            key = FLAG_ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        elif "=" in item:
            key, _, value = item.partition("=")
        else:
            raise DistilrayError(f"unexpected argument {item!r}: use key=value or --key VALUE")
        overrides.append(f"{resolve_key(cls, key)}={value}")
        i += 1
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilray", description="Make language models faster and leaner, on Ray.")
    parser.add_argument("--verbose", action="store_true", help="show every log line, workers' included")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=f"{command.help}. Keys: {', '.join(all_keys(command.config))}"
        )
        p.add_argument("--config", help="YAML file of config keys")
        p.add_argument("--verbose", action="store_true", help="show every log line, workers' included")
    bench = sub.add_parser("bench", help="benchmarks (JSON out)")
    bench.add_argument("benchmark", choices=[b.name for b in BENCHMARKS])
    bench.add_argument("--config", help="YAML file of config keys")
    bench.add_argument("--verbose", action="store_true", help="show every log line, workers' included")
    return parser


def run_command(command: Command, cfg) -> int:
    """Run one command and print its result."""
    print(command.render(command.runner()(cfg)))
    if getattr(cfg, "json_out", ""):
        print(f"wrote {cfg.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from distilray.console import configure_output, log_folder

    configure_output(verbose=args.verbose)
    try:
        command = find(args.benchmark, benchmark=True) if args.command == "bench" else find(args.command)
        cfg = load_config(command.config, args.config, flags_to_overrides(command.config, extra))
        return run_command(command, cfg)
    except DistilrayError as e:
        print(f"distilray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distilray: interrupted; re-run the same command to resume from the latest checkpoint", file=sys.stderr)
        return 130
    finally:
        folder = log_folder()
        if folder and not args.verbose:
            print(f"(worker logs: {folder})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
