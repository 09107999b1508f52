"""`tuneworks`: the one command of the stack. Every subcommand reads its settings from `FT_*` variables."""

from __future__ import annotations

import argparse
import logging
import sys

from core.settings import Settings, env_help


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneworks",
        description="Self-hosted LLM fine-tuning with an OpenAI-compatible API.",
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("up", "run API, worker, inference and (when FT_REDIS_URL is unset) Redis on this machine"),
        ("api", "run the OpenAI-compatible API (uvicorn)"),
        ("worker", "run an arq worker that validates files and trains adapters"),
        ("serve", "run and supervise the vLLM servers and keep adapters loaded"),
    ]:
        sub.add_parser(
            name, help=text, epilog=env_help(), formatter_class=argparse.RawDescriptionHelpFormatter
        )
    keys = sub.add_parser("keys", help="create, list or revoke API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="print a new API key for a project (the only line on stdout)")
    create.add_argument("--project", required=True, help="project name (created when new)")
    revoke = keys.add_parser("revoke", help="revoke an API key (at once: keys are not cached)")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="key_id", help="the key's id (key_..., as `keys list` shows it)")
    which.add_argument(
        "key", nargs="?", help="the secret key itself (prefer --id: no secret on a command line)"
    )
    listing = keys.add_parser(
        "list", help="list keys: id, project, prefix, created, revoked (never the secret)"
    )
    listing.add_argument("--project", help="only the keys of this project")
    sub.add_parser(
        "drill",
        help="fault drill: kill worker, Redis, vLLM and API of a fresh `up` at random while jobs train, then "
        "report jobs lost, duplicates and recovery times (`tuneworks drill --help`)",
        add_help=False,
    )
    models = sub.add_parser("models", help="base models; export or import fine-tuned ones").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser("list", help="list the base models and whether their weights are prepared")
    prepare = models.add_parser("prepare", help="prepare base model weights under FT_HOME/models")
    prepare.add_argument("model", nargs="*", help="model ids (default: FT_BASE_MODELS)")
    from tuneworks import model_cli

    model_cli.add_commands(models)  # export, import
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drill"]:  # its own options: `tuneworks drill --help`
        from tuneworks import drill

        return drill.main(argv[1:])
    args = _parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(_dispatch(args, settings) or 0)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    if args.command == "up":
        from tuneworks.stack import run_up

        return run_up(settings)
    if args.command == "api":
        from service.app import run_api

        return run_api(settings)
    if args.command == "worker":
        from runner.worker import run_worker

        return run_worker(settings)
    if args.command == "serve":
        from serving.main import run_serve

        return run_serve(settings)
    if args.command == "keys":
        from service import keys

        if args.keys_command == "create":
            print(keys.create_key_cli(settings, project=args.project))
            return 0
        if args.keys_command == "list":
            return keys.list_keys_cli(settings, project=args.project)
        return keys.revoke_key_cli(settings, key=args.key, key_id=args.key_id)
    from tuneworks import model_cli

    return model_cli.dispatch(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
