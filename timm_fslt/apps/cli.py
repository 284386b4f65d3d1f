"""The ``fslt`` command (also ``python -m timm_fslt``).

    fslt info TICKET                 size report and config of a ticket (directory or Hub repo id)
    fslt push TICKET REPO_ID         upload a saved ticket and its model card to the Hub
    fslt demo [ARGS...]              run timm_fslt.apps.demo.main(ARGS)
    fslt --version                   print ``fslt <version>``
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
from typing import Optional, Sequence

from timm_fslt.apps.console import app_logging
from timm_fslt.errors import TicketError
from timm_fslt.version import __version__

log = logging.getLogger(__name__)


def _metric(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not name or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER (e.g. accuracy=0.91), got {text!r}")
    return name, number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fslt", description="Compact strong lottery tickets in partially frozen random networks.")
    parser.add_argument("--version", action="version", version=f"fslt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="print a ticket's size report and config")
    info.add_argument("ticket", help="ticket directory or Hub repo id (user/name)")
    info.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    push = sub.add_parser("push", help="upload a saved ticket and a generated model card to the Hub")
    push.add_argument("ticket", help="ticket directory (written by timm_fslt.save_ticket)")
    push.add_argument("repo_id", help="Hub model repo id, user/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token-file", default=None, metavar="FILE",
                      help="read the Hub token from FILE (default: HF_TOKEN, then the saved `hf auth login`)")
    push.add_argument("--token", default=None,
                      help="Hub token on the command line (discouraged: other users see it in the process "
                           "list and it stays in shell history; use HF_TOKEN or --token-file)")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--metric", action="append", type=_metric, default=[], metavar="NAME=VALUE",
                      help="a result to show on the model card (repeatable), e.g. accuracy=0.91")
    push.add_argument("--dataset", action="append", default=[], metavar="DATASET_ID",
                      help="Hub dataset id the metrics were measured on (repeatable)")
    push.add_argument("--timm-weights", action="store_true",
                      help="also upload timm's model.safetensors (the materialized ticket: the dense effective "
                           "weights, ~4 bytes a weight) so that plain timm loads the repo with pretrained=True; "
                           "a ticket saved without it is rebuilt from its seed to write it")

    sub.add_parser("demo", help="run the demo (timm_fslt.apps.demo); arguments are passed on", add_help=False)
    return parser


def _info(args) -> int:
    from timm_fslt.ticket.format import MASK_NAME, STATE_NAME, check_listed_file, read_ticket, size_report_from_config
    from timm_fslt.ticket.sources import resolve_ticket_source

    found = resolve_ticket_source(args.ticket, revision=args.revision)
    directory = found.directory
    config, _, _ = read_ticket(directory, root=found.root)  # verifies the config and both checksums
    report = size_report_from_config(config)
    if args.json:
        print(json.dumps({"ticket": str(directory), "size_report": report.to_dict(), "config": config}, indent=2))
        return 0
    extra = []  # files the ticket lists beyond the three load_ticket reads: timm's weights (timm_weights=True)
    for name in sorted(set(config["files"]) - {MASK_NAME, STATE_NAME}):
        record, path = config["files"][name], directory / name
        if found.repo_id is not None and not path.exists():
            extra.append(f"{name}: {record.get('bytes', 0):,} bytes on the Hub (not downloaded; "
                         "load_ticket does not read it)")
            continue
        data = check_listed_file(path, record)
        extra.append(f"{name}: {len(data):,} bytes, sha256 verified (timm's weights; load_ticket does not read it)")
    print(f"ticket: {directory}")
    print("files: config.json, supermask.safetensors, state.safetensors (sha256 verified)")
    for line in extra:
        print(f"       {line}")
    print(f"config_sha256: {(config.get('integrity') or {}).get('config_sha256', 'none (format 1 ticket)')}")
    print()
    print(report)
    print()
    print("config.json:")
    print(json.dumps(config, indent=2))
    return 0


def _token(args) -> Optional[str]:
    if args.token is not None and args.token_file is not None:
        raise TicketError("--token and --token-file: give one of them")
    if args.token is not None:
        log.warning("a token given with --token is visible to other users in the process list "
                    "and stays in shell history; prefer HF_TOKEN or --token-file")
        return args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise TicketError(f"--token-file: cannot read {args.token_file!r}: {err.strerror}") from None
        if not token or any(c.isspace() for c in token):
            raise TicketError(f"--token-file: {args.token_file!r} must hold one token on one line")
        return token
    return None  # huggingface_hub reads HF_TOKEN, then the saved login


def _push(args) -> int:
    from timm_fslt.ticket.hub import push_to_hub

    info = push_to_hub(args.ticket, args.repo_id, private=args.private, token=_token(args),
                       commit_message=args.message, metrics=dict(args.metric) or None,
                       datasets=args.dataset or None, timm_weights=args.timm_weights)
    print(f"pushed {args.ticket} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _demo(rest: list[str]) -> int:
    try:
        demo = importlib.import_module("timm_fslt.apps.demo")
    except ModuleNotFoundError as err:
        if err.name != "timm_fslt.apps.demo":
            raise
        print("fslt demo: the demo is not available in this installation (no module timm_fslt.apps.demo)",
              file=sys.stderr)
        return 2
    code = demo.main(rest)
    return int(code or 0)


def _demo_not_first() -> int:
    # Some Pythons' argparse drop a leading "--" and pick the demo subcommand, which the parser
    # path cannot run (the demo's arguments are parsed by the demo); say how to call it instead.
    print("usage: fslt demo [ARGS...]\nfslt: error: demo: `demo` must be the first argument "
          "(e.g. `fslt demo --quick`); nothing may come before it, not even `--`", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fslt`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after "demo" belongs to the demo's own parser
        return _demo(argv[1:])
    leading = next((i for i, a in enumerate(argv) if a != "--"), len(argv))
    if argv[leading:leading + 1] == ["demo"]:  # `fslt -- demo`: refused before argparse sees it
        return _demo_not_first()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help or --version (0), or a usage error argparse already printed (2)
        return int(exit_.code or 0)
    if args.command == "demo":  # argparse found "demo" after something else; it has no ticket to push
        return _demo_not_first()
    try:
        with app_logging(f"fslt {args.command}"):
            return _info(args) if args.command == "info" else _push(args)
    except TicketError as err:
        print(f"fslt {args.command}: error: {err}", file=sys.stderr)
        return 1
