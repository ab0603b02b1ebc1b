"""The `fedrec` command line: parses arguments once, turns project errors into one clean line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedrec.client.audit import command as audit_command
from fedrec.common.errors import FedrecError

if TYPE_CHECKING:
    from fedrec.common.assets import Sources
    from fedrec.common.config import Config
    from fedrec.server.serving.service import ServeSettings

log = logging.getLogger("fedrec")
API_KEY_ENV = "FEDREC_API_KEY"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--output", type=Path, help="run directory (default: runs/<name>)")
    parser.add_argument("--data", help="local data set directory (skips the download)")
    parser.add_argument("--model", help="local model directory, .gguf file or hub id")
    parser.add_argument("--cache-dir", type=Path,
                        help="asset cache (default: $FEDREC_CACHE or ~/.cache/fedrec)")
    parser.add_argument("--offline", action="store_true", help="use only the cache; no network")
    parser.add_argument("--deterministic", action="store_true",
                        help="seeded sampling masks and noise (train.deterministic): tests and "
                             "benchmarks only, NOT private; recorded in every ledger line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    central = sub.add_parser("train-central", help="centralized reference runs (no Flower)")
    _common(central)
    simulate = sub.add_parser("simulate", help="federated training of N simulated clients (Flower)")
    _common(simulate)
    simulate.add_argument("--resume", action="store_true",
                          help="continue the run in --output from its last checkpoint")
    audit_command.add_arguments(sub.add_parser(
        "audit", help="verify privacy ledgers independently; optional canary audit"))
    _deploy(sub.add_parser("deploy", help="set up a real federation (SuperLink + SuperNodes)"))
    _serve(sub.add_parser("serve", help="HTTP recommendation service over a run directory"))
    recommend = sub.add_parser("recommend", help="one-off recommendations from a run directory")
    _serving(recommend)
    recommend.add_argument("--history", action="append", default=[], metavar="ID_OR_TITLE",
                           help="an item the user liked, oldest first (repeatable)")
    recommend.add_argument("--text", help="the user's taste in their own words (cold start)")
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--include-seen", action="store_true", help="allow the history's own items")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fetch = sub.add_parser("fetch", help="download and verify the default assets into the cache")
    fetch.add_argument("--cache-dir", type=Path)
    fetch.add_argument("--offline", action="store_true")
    return parser


def _deploy(deploy: argparse.ArgumentParser) -> None:
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    init = deploy_sub.add_parser("init", help="certificates, SuperNode keys, commands and READMEs")
    init.add_argument("dir", type=Path, help="new directory to generate everything into")
    init.add_argument("--institutions", required=True, metavar="NAME[,NAME...]",
                      help="one SuperNode per institution, e.g. hospital-a,clinic-b")
    init.add_argument("--superlink", required=True, metavar="HOST[:PORT]",
                      help="the coordinator's address as the institutions reach it (port default 9092)")
    init.add_argument("--site-root", default="/var/lib/fedrec", metavar="PATH",
                      help="each institution's data/state/cache root ({name} is replaced by its name)")
    init.add_argument("--epsilon-budget", type=float, default=8.0,
                      help="initial ε budget in each institution's settings.toml (theirs to change)")
    init.add_argument("--app-dir", type=Path, help="the fedrec source tree `flwr run` packages")
    init.add_argument("--insecure", action="store_true",
                      help="DEVELOPMENT ONLY: no TLS, no SuperNode authentication, one machine")
    init.add_argument("--institution-keys", type=Path, metavar="DIR",
                      help="the institutions' public keys, as `fedrec deploy keygen` wrote them: "
                           "DIR/<name>/supernode.pub and DIR/<name>/ledger.pub (required unless --insecure)")
    init.add_argument("--control-host", default="127.0.0.1", metavar="HOST",
                      help="interface of the SuperLink's HTTP port in superlink.sh; the Control API "
                           "shares it in Flower 1.42 (default loopback: expose it only behind a proxy "
                           "that forwards the Fleet API alone, see the coordinator README)")
    keygen = deploy_sub.add_parser("keygen", help="an institution's own keys: ledger signing + SuperNode")
    keygen.add_argument("dir", type=Path, help="where to write them (e.g. the institution's state dir)")
    keygen.add_argument("--name", help="the institution's name (comment of the SuperNode key)")
    keygen.add_argument("--no-supernode-key", action="store_true",
                        help="only the ledger key (a simulated client, or a second state dir)")


def _serve(serve: argparse.ArgumentParser) -> None:
    _serving(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="processes, each with its own model copy")
    serve.add_argument("--api-key-file", type=Path,
                       help=f"require this key in the X-API-Key header (or set ${API_KEY_ENV})")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser calls from this origin (repeatable; default: no CORS)")
    serve.add_argument("--no-batching", action="store_true", help="score every request alone")
    serve.add_argument("--max-batch", type=int, default=32, help="requests per micro-batch")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long a micro-batch waits for more requests")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting to be scored before more are answered 503")
    serve.add_argument("--rate", type=float, default=20.0,
                       help="requests per second per API key or client address (429 beyond; 0: no limit)")
    serve.add_argument("--burst", type=int, default=40, help="requests a caller may send at once")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback --host without an API key (logged loudly)")


def _serving(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory with a final adapter")
    parser.add_argument("--method", help="central runs: whose adapter, e.g. central-dp-lora")
    parser.add_argument("--data", help="catalogue to rank (a data set directory; default: the run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's model.device")
    parser.add_argument("--merge", action="store_true",
                        help="fold LoRA into the base weights (not faster on CPU; see benchmarks/README.md)")
    parser.add_argument("--encode-batch", type=int,
                        help="prompts per forward pass (default: 8 on CPU, 32 on GPU)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--offline", action="store_true")


def config_from_args(args: argparse.Namespace) -> Config:
    from fedrec.common.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "deterministic", False):
        overrides.append("train.deterministic=true")
    if args.data:
        overrides.append(f"data.dataset={_toml_str(args.data)}")
    if args.model:
        overrides.append(f"model.name={_toml_str(args.model)}")
    return load_config(args.config, overrides)


def sources_from_args(args: argparse.Namespace) -> Sources:
    from fedrec.common.assets import Sources, default_cache_dir, default_offline

    return Sources(cache_dir=args.cache_dir or default_cache_dir(),
                   offline=bool(args.offline or default_offline()))


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_train_central(args: argparse.Namespace) -> int:
    from fedrec.simulations.central import results_table, run_central

    cfg = config_from_args(args)
    out = args.output or Path("runs") / cfg.name
    rows = run_central(cfg, out, sources_from_args(args))
    sys.stdout.write(results_table(rows))
    sys.stdout.write(f"run directory: {out}\n")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedrec.common.rundir import RunDir
    from fedrec.simulations.federated import simulate

    cfg = config_from_args(args)
    if cfg.name == "central":  # the default name belongs to train-central
        cfg = dataclasses.replace(cfg, name="federated")
    out = args.output or Path("runs") / cfg.name
    final = simulate(cfg, out, sources_from_args(args), resume=args.resume)
    report = RunDir(out, create=False).report_md
    sys.stdout.write(report.read_text() if report.exists() else f"{final}\n")
    sys.stdout.write(f"run directory: {out}\n")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from fedrec.common.assets import fetch_dataset, fetch_model

    sources = sources_from_args(argparse.Namespace(cache_dir=args.cache_dir, offline=args.offline))
    data = fetch_dataset("ml-100k", cache_dir=sources.cache_dir, offline=sources.offline)
    model = fetch_model(cache_dir=sources.cache_dir, offline=sources.offline)
    sys.stdout.write(f"ml-100k: {data}\nmodel: {model.path} ({model.source})\n")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    return audit_command.run(args)


def cmd_deploy(args: argparse.Namespace) -> int:
    from fedrec.server.deployment.generate import init_deployment
    from fedrec.server.deployment.keys import institution_keygen
    from fedrec.server.deployment.plan import INSECURE_BANNER, parse_institutions

    if args.deploy_command == "keygen":
        written = institution_keygen(args.dir, name=args.name, supernode=not args.no_supernode_key)
        sys.stdout.write("".join(f"  {p}\n" for p in written)
                         + "private keys (*.key) stay here; send only the .pub files to the coordinator "
                           "and ledger.pub to your privacy officer\n")
        return 0
    dep = init_deployment(
        args.dir, institutions=parse_institutions(args.institutions), superlink=args.superlink,
        insecure=args.insecure, app_dir=args.app_dir, site_root=args.site_root,
        epsilon_budget=args.epsilon_budget, institution_keys=args.institution_keys,
        control_host=args.control_host,
    )
    if dep.insecure:
        sys.stderr.write(f"\n!!! {INSECURE_BANNER}\n\n")
    sys.stdout.write(
        f"deployment in {args.dir}: SuperLink {dep.address}, {len(dep.institutions)} institutions\n"
        f"  coordinator: {args.dir / 'coordinator'} (superlink.sh, register-supernodes.sh, run.sh)\n"
        + "".join(f"  {n}: {args.dir / 'institutions' / n} (send this folder to {n})\n"
                  for n in dep.institutions))
    return 0


def _serve_settings(args: argparse.Namespace) -> ServeSettings:
    from fedrec.server.serving.service import ServeSettings

    return ServeSettings(method=args.method, data=args.data, device=args.device, merge=args.merge,
                         encode_batch=args.encode_batch)


def _api_key(path: Path | None) -> str | None:
    if path is None:  # taken out of the environment, so that no child process inherits it
        return os.environ.pop(API_KEY_ENV, None) or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FedrecError(f"--api-key-file {path}: cannot be read ({exc.strerror})") from None
    if not key:
        raise FedrecError(f"--api-key-file {path} is empty; write the key into it")
    return key


def _api_key_given(args: argparse.Namespace) -> bool:
    return args.api_key_file is not None or bool(os.environ.get(API_KEY_ENV))


def cmd_serve(args: argparse.Namespace) -> int:
    from fedrec.server.serving.http import HttpSettings, ServeSpec, check_bind, run
    from fedrec.server.serving.service import locate_run

    locate_run(args.run_dir, args.method)  # a wrong RUN_DIR fails here, not in each worker
    check_bind(args.host, has_key=_api_key_given(args), insecure_no_auth=args.insecure_no_auth)
    http = HttpSettings(api_key=_api_key(args.api_key_file), cors_origins=tuple(args.cors_origin),
                        batching=not args.no_batching, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, rate=args.rate,
                        burst=args.burst)
    sources = sources_from_args(args)
    spec = ServeSpec(run_dir=str(args.run_dir), cache_dir=str(sources.cache_dir), offline=sources.offline,
                     serve=dataclasses.asdict(_serve_settings(args)), http=dataclasses.asdict(http))
    run(spec, host=args.host, port=args.port, workers=args.workers, insecure_no_auth=args.insecure_no_auth)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from fedrec.server.serving.service import load_service

    sources = sources_from_args(args)
    service = load_service(args.run_dir, _serve_settings(args), cache_dir=sources.cache_dir,
                           offline=sources.offline)
    query = service.query(history=args.history, text=args.text, k=args.k, exclude_seen=not args.include_seen)
    items = service.recommend([query])[0]
    if args.json:
        sys.stdout.write(json.dumps({"items": [dataclasses.asdict(i) for i in items]}, indent=2) + "\n")
        return 0
    width = max(len(i.item_id) for i in items) if items else 0
    for rank, item in enumerate(items, start=1):
        because = "; ".join(r.title for r in item.because)
        sys.stdout.write(f"{rank:>3}  {item.item_id:<{width}}  {item.score:8.3f}  {item.title}"
                         + (f"  (because you liked {because})" if because else "") + "\n")
    return 0


COMMANDS = {"train-central": cmd_train_central, "simulate": cmd_simulate, "fetch": cmd_fetch,
            "audit": cmd_audit, "deploy": cmd_deploy, "serve": cmd_serve, "recommend": cmd_recommend}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        for noisy in ("flwr", "alembic", "ray"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger("flwr").propagate = False  # Flower prints its own lines once
    try:
        return COMMANDS[args.command](args)
    except FedrecError as exc:
        sys.stderr.write(f"fedrec: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fedrec: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
