"""Federated benchmarks on MovieLens-100K with the default model -> results/federated.json.

    python benchmarks/federated.py [--parts privacy,local,scale,noise] [--eps 8,4,1]
                                   [--variants lora,ffa] [--set key=value ...] [--label TEXT]
                                   [--seeds 3] [--config simulations/configs/X.toml]
                                   [--scale-clients 10,100] [--scale-users 400]

`--seeds N` runs each privacy/local row N times (train.seed = 0, 1, ...; every private release
draws fresh OS entropy, so the runs are independent noise draws) and stores the mean of every
metric, `ndcg@10_sd`, `seeds` and `per_seed`, as benchmarks/central_bench.py does. `--config`
runs a preset; its rows are named `<method>-<preset stem>` (e.g. `fed-dp-lora-eps8-movielens-institutions`).

Parts (each writes its rows into results/federated.json as soon as it finishes, replacing rows
of the same method, so a long sweep can be stopped and resumed):

- privacy: `fedrec simulate` (Flower Simulation Engine, the shipped design) at each ε and LoRA
  variant -> rows `fed-dp-<variant>-eps<ε>` (fused with the private prior) and `...-llm-only`.
- local:   local-only training, each institution alone under the same ε (the same client code,
  no aggregation; each client ranks with its own adapter and its own noisy counts) ->
  `local-dp-lora-eps<ε>`; metrics averaged over the clients' test users.
- scale:   one round with 10 and with 100 simulated clients (400 users in all, prior off, half a
  local epoch); peak resident memory of the whole process tree (driver, Ray and its workers),
  sampled every 0.2 s -> `scale_rows`.
- plot:    results/federated.html, NDCG@10 against ε per method (also written after every run).
- noise:   the noise-to-signal arithmetic of user-level DP-SGD for federated plans (no training):
  σ calibrated for the plan, and the std of the noise on the averaged clipped update relative
  to the clip norm, per step -> `noise` rows.

Rows share the schema of results/central.json plus `clients`, `rounds`,
`bytes_up_per_client_round`, `model_bytes` and `round_seconds`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from fedrec.client.local import ClientJob, LocalSettings, load_split, simulated_clients
from fedrec.common import wire
from fedrec.common.assets import Sources, default_cache_dir
from fedrec.common.config import Config, load_config
from fedrec.common.evaluation import BLEND_WEIGHTS, CFSettings
from fedrec.common.ledger import LedgerLine, read_ledger
from fedrec.common.prior import CollaborativePrior, head_items, load_prior
from fedrec.common.privacy.party import Party
from fedrec.common.recommender import build_recommender
from fedrec.common.rundir import RunDir, read_jsonl
from fedrec.common.wire import RoundRequest
from fedrec.server.evaluation import choose_released_weight
from fedrec.server.ledgers import validation_noise
from fedrec.simulations.federated import simulate

RESULTS = Path(__file__).resolve().parent / "results" / "federated.json"
log = logging.getLogger("bench")


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save_rows(rows: list[dict[str, Any]], key: str, meta: dict[str, Any]) -> None:
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if doc.get("design") != "item-encoder":  # the file of the previous design: start afresh
        doc = {"design": "item-encoder"}
    doc.update({k: v for k, v in meta.items() if k not in doc or k == "machine"})
    # settings differ between invocations: each row keeps the overrides and scale it ran with
    rows = [{**r, "overrides": meta["overrides"], "scale": meta["scale"]} for r in rows]
    kept = [r for r in doc.get(key, []) if r["method"] not in {x["method"] for x in rows}]
    doc[key] = kept + rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def base_row(cfg: Config, method: str, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    k = cfg.eval.ks[0]
    return {
        "dataset": cfg.data.dataset, "model": cfg.model.name, "method": method, "device": "cpu",
        "hr@10": round(metrics.get(f"hr@{k}", 0.0), 5), "ndcg@10": round(metrics.get(f"ndcg@{k}", 0.0), 5),
        "mrr@10": round(metrics.get(f"mrr@{k}", 0.0), 5), **extra,
    }


def over_seeds(run: Callable[[list[str]], list[dict]], overrides: list[str], seeds: int,
               preset: Path | None) -> list[dict]:
    """`run` once per seed, rows summarised over the seeds (mean, sd, per seed), named for the preset."""
    from central_bench import summarise  # benchmarks/ is this script's directory

    runs = [run([*overrides, f"train.seed={seed}"]) for seed in range(seeds)]
    rows = summarise(runs, "")
    if preset is not None:
        for row in rows:
            method = row["method"]
            row["method"] = (f"{method.removesuffix('-llm-only')}-{preset.stem}-llm-only"
                             if method.endswith("-llm-only") else f"{method}-{preset.stem}")
            row["preset"] = str(preset)
    return rows


ExactTest = tuple[dict[str, float], dict[str, float], dict[str, float], int]  # blend, CF, LLM, users


def exact_test(cfg: Config, sources: Sources, adapter: dict[str, Any], prior: CollaborativePrior | None,
               weight: float, users: list[str] | None = None, *, loaded: Any = None,
               data: tuple[Any, Any] | None = None) -> ExactTest:
    """(blend, CF alone, LLM alone) test metrics computed exactly, centrally, from a run's final
    adapter, prior and blend weight — a measurement the simulation can make because it holds
    every client's data; the run's own test metrics are DP-noised by the clients (their policy) and
    too noisy to compare methods with (their noise is sized for the institutions' budgets).
    `loaded` and `data` (dataset, split) are reused when given, loaded otherwise. Returns
    (blend, CF alone, LLM alone, test users)."""
    from fedrec.common.catalogue import catalogue_cached
    from fedrec.common.evaluation import eval_users, evaluate
    from fedrec.common.lora import load_adapter
    from fedrec.simulations.central import blend, catalogue_vectors, cf_scores, llm_scores

    dataset, split = data or load_split(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    loaded = loaded or build_recommender(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    load_adapter(loaded.model, {**loaded.initial_adapter, **adapter}, source="the run's final adapter")
    catalogue = catalogue_cached(loaded.encoder, dataset.item_texts, cache_dir=sources.cache_dir,
                                 model_fingerprint=loaded.base.fingerprint, batch_size=cfg.eval.batch_size)
    who = eval_users(split, which="test", users=users)
    llm = llm_scores(catalogue_vectors(loaded.encoder, catalogue), who.histories, window=cfg.data.max_history)
    settings = CFSettings(beta=cfg.prior.beta, shrink=cfg.prior.shrink)
    cf = cf_scores(prior, who.histories, len(dataset.item_ids), settings)
    ks = cfg.eval.ks
    return (evaluate(blend(cf, llm, weight), who, ks=ks), evaluate(cf, who, ks=ks), evaluate(llm, who, ks=ks),
            len(who.user_ids))


def run_privacy(overrides: list[str], eps: float, variant: str, sources: Sources, tmp: Path,
                preset: Path | None = None) -> list[dict]:
    cfg = load_config(preset, [*overrides, f"privacy.target_epsilon={eps}", f"lora.variant=\"{variant}\""])
    out = tmp / f"fed-{variant}-{eps:g}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    final = simulate(cfg, out, sources)
    wall = time.perf_counter() - t0
    run = RunDir(out, create=False)
    rounds = read_jsonl(run.rounds)
    ledgers = {name: read_ledger(path) for name, path in run.ledgers().items()}
    spent = max(lines[-1].epsilon for lines in ledgers.values())
    delta = max(lines[-1].delta for lines in ledgers.values())
    up = sum(r["bytes_up_per_client"] for r in rounds) / len(rounds)
    extra = {
        "epsilon": round(spent, 4), "delta": delta, "users": int(final["test_users"]),
        "clients": len(ledgers), "rounds": len(rounds), "bytes_up_per_client_round": int(up),
        "model_bytes": rounds[0]["model_bytes"], "bytes_ratio": up / rounds[0]["model_bytes"],
        "round_seconds": round(sum(r["seconds"] for r in rounds) / len(rounds), 1),
        "train_seconds": round(wall, 1), "blend_weight": final["blend_weight"],
    }
    name = f"fed-dp-{variant}-eps{eps:g}"
    from safetensors.torch import load_file

    prior = load_prior(run.final().prior) if run.final().prior.is_file() else None
    weight = float(final["blend_weight"] or 0.0)
    adapter = load_file(str(run.final().adapter))
    fused, cf, llm, users = exact_test(cfg, sources, adapter, prior, weight)
    extra["users"] = users
    extra["noised_test_ndcg@10"] = round(final["test"].get(f"ndcg@{cfg.eval.ks[0]}", float("nan")), 5)
    rows = [base_row(cfg, name, fused if prior is not None else llm, **extra)]
    if prior is not None:
        rows[0]["cf_only_ndcg@10"] = round(cf[f"ndcg@{cfg.eval.ks[0]}"], 5)
        rows[0]["llm_contribution_ndcg@10"] = round(rows[0]["ndcg@10"] - rows[0]["cf_only_ndcg@10"], 5)
        rows.append(base_row(cfg, name + "-llm-only", llm, **extra))
    return rows


def run_local(overrides: list[str], eps: float, sources: Sources, tmp: Path,
              preset: Path | None = None) -> list[dict]:
    """Each client alone: its own rounds of DP training, its own prior, its own β (on its valid)."""
    cfg = load_config(preset, [*overrides, f"privacy.target_epsilon={eps}"])
    dataset, split = load_split(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    clients = simulated_clients(cfg, dataset, split)
    loaded = build_recommender(cfg, cache_dir=sources.cache_dir, offline=sources.offline)
    trainable = {k: v for k, v in loaded.initial_adapter.items()}
    fused: dict[str, float] = {}
    alone: dict[str, float] = {}
    users = 0.0
    spent = delta = 0.0
    t0 = time.perf_counter()
    for name, part in sorted(clients.items()):
        state = tmp / f"local-{eps:g}" / name
        shutil.rmtree(state, ignore_errors=True)
        local = LocalSettings(name, state, eps, cfg.privacy.delta, sources.cache_dir, sources.offline)
        job = ClientJob(cfg, local, dataset, part, loaded=loaded)
        delta = max(delta, job.delta)
        req = RoundRequest("local", 0, cfg.fed.rounds, cfg.fed.local_epochs, cfg.train.lr)
        prior = None
        if cfg.prior.enabled:  # this client's own releases, its own head
            counts = job.prior_counts(req).tensors[wire.COUNTS].numpy().astype("float64")
            head = head_items(counts, cfg.prior.head_size)
            cooc, noise = None, 0.0
            if cfg.prior.cooccurrence:  # the release's σ·clip, as its ledger line says
                released = job.cooccurrence(req, head)
                cooc = released.tensors[wire.COOCCURRENCE].numpy().astype("float64")
                line = LedgerLine.from_dict(released.ledger or {}, source=f"{name}'s co-occurrence")
                noise = line.noise_std
            prior = CollaborativePrior(counts, head if cooc is not None else head[:0], cooc, noise)
        current = dict(trainable)
        for rnd in range(1, cfg.fed.rounds + 1):
            out = job.train(current, RoundRequest("local", rnd, cfg.fed.rounds, cfg.fed.local_epochs,
                                                  cfg.train.lr), prior=prior)
            current = {**current, **out.tensors}
            spent = max(spent, out.metrics[wire.EPSILON])
        weights = list(BLEND_WEIGHTS) if prior is not None else []
        # the blend weight by the server's rule: the best DP-noised validation value, unless its
        # lead over CF alone is inside that noise (whose std the ledger line gives)
        outcome = job.evaluate(current, which="valid", prior=prior, weights=weights)
        evaluation = {"metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, list)},
                      "betas": weights, "users": float(outcome.metrics.get(wire.NUM_EXAMPLES, 0.0))}
        line = dict(outcome.ledger or {})
        rnd = LedgerLine.from_dict(line, source=f"{name}'s evaluation").round if line else -1
        noise = validation_noise({name: [line]}, rnd, evaluation) if line else 0.0
        weight = choose_released_weight(evaluation, f"ndcg@{cfg.eval.ks[0]}", noise) if weights else 1.0
        print(json.dumps({"client": name, "blend_weight": weight, "validation_noise_std": round(noise, 4)}),
              flush=True)
        # its test users ranked exactly with its own adapter and prior (the DP-noised metrics a
        # client reports are too noisy to compare methods with; see exact_test)
        blended, _, llm, n = exact_test(cfg, sources, current, prior, weight, users=sorted(part.train),
                                        loaded=loaded, data=(dataset, split))
        users += n
        for key in blended:
            fused[key] = fused.get(key, 0.0) + n * blended[key]
            alone[key] = alone.get(key, 0.0) + n * llm[key]
    fused = {k: v / users for k, v in fused.items()}
    alone = {k: v / users for k, v in alone.items()}
    extra = {"epsilon": round(spent, 4), "delta": delta, "users": int(users),
             "clients": len(clients), "rounds": cfg.fed.rounds, "bytes_up_per_client_round": 0,
             "train_seconds": round(time.perf_counter() - t0, 1)}
    return [base_row(cfg, f"local-dp-lora-eps{eps:g}", fused, **extra),
            base_row(cfg, f"local-dp-lora-eps{eps:g}-llm-only", alone, **extra)]


def run_scale(overrides: list[str], clients: int, users: int, sources: Sources, tmp: Path) -> dict[str, Any]:
    cfg = load_config(None, [*overrides, f"fed.clients={clients}", "fed.rounds=1", "fed.local_epochs=1",
                             f"data.max_users={users}", "prior.enabled=false", "privacy.target_epsilon=8"])
    out = tmp / f"scale-{clients}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        simulate(cfg, out, sources)
    rounds = read_jsonl(RunDir(out, create=False).rounds)
    return {"method": f"scale-{clients}-clients", "clients": clients, "users": users,
            "peak_rss_mib": round(mem.peak / 2**20, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            "round_seconds": rounds[0]["seconds"],
            "bytes_up_per_client_round": rounds[0]["bytes_up_per_client"]}


def noise_rows() -> list[dict[str, Any]]:
    """σ and per-step noise std / clip norm on the noisy sum normalised by the users, for the
    shipped plans at ε = 8 (the prior releases taking their budget share first)."""
    rows = []
    plans = [  # (label, users in all, clients, rounds, steps per round at each client)
        ("central: 1 party x 5 full-batch steps", 943, 1, 1, 5),
        ("shipped default: 3 clients x 3 rounds x 2 full-batch steps", 943, 3, 3, 2),
        ("movielens-institutions: 5 clients x 5 rounds x 2 full-batch steps", 943, 5, 5, 2),
    ]
    for label, users, clients, rounds, steps in plans:
        n = users // clients
        party = Party(name=label, users=n, budget=8.0)  # one client: δ = default_delta(its users)
        plan = party.prior_plan(share=0.75, popularity_share=0.3, cooccurrence=True)
        sigma = party.sgd_sigma(sample_rate=1.0, steps=steps * rounds, planned=lambda p=plan: p.steps)
        rows.append({"method": "noise", "plan": label, "users_per_client": n, "sample_rate": 1.0,
                     "steps_total": steps * rounds, "noise_multiplier": round(sigma, 3),
                     "prior_noise_multipliers": [round(x.noise_multiplier, 3) for x in plan.steps],
                     "noise_std_over_clip_per_step": round(sigma / n, 4),
                     "after_fedavg_over_clients": round(sigma / n / clients ** 0.5, 4)})
    return rows


def write_plot() -> Path:
    """results/privacy_utility.svg (and federated.html): test NDCG@10 against ε for popularity, CF,
    the hybrid, central vs federated, from central.json and federated.json."""
    from fedrec.server.report import line_plot

    results = RESULTS.parent
    central = json.loads((results / "central.json").read_text()).get("rows", []) \
        if (results / "central.json").exists() else []
    federated = json.loads(RESULTS.read_text()).get("rows", []) if RESULTS.exists() else []
    families = {"dp-popularity": "popularity (central)", "dp-cooccurrence": "CF: dp-cooccurrence (central)",
                "central-dp-lora": "hybrid: central-dp-lora",
                "fed-dp-lora": "hybrid: federated, 3 institutions",
                "local-dp-lora": "local-only (each institution alone)"}
    series: dict[str, list[tuple[float, float]]] = {}
    for r in [*central, *federated]:
        if r["method"].endswith("-llm-only") or r.get("epsilon") is None:
            continue
        family = re.sub(r"-eps[0-9.]+$", "", r["method"])
        if family in families:
            series.setdefault(families[family], []).append((round(float(r["epsilon"])), float(r["ndcg@10"])))
    svg = line_plot({k: sorted(v) for k, v in sorted(series.items())},
                    "test NDCG@10 against ε (user-level), MovieLens-100K, all 943 users", "ε")
    svg = svg[svg.index("<svg"):]
    (results / "privacy_utility.svg").write_text(svg.replace("<svg ",
                                                             "<svg xmlns='http://www.w3.org/2000/svg' ", 1))
    out = RESULTS.with_suffix(".html")
    out.write_text("<!doctype html><meta charset='utf-8'><title>fedrec privacy-utility</title>"
                   "<body style='font-family:sans-serif'>" + svg + "</body>\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="privacy,local,scale,noise")
    parser.add_argument("--eps", default="8,4,1")
    parser.add_argument("--variants", default="lora,ffa")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--label", default="full size (defaults: all 943 users)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per privacy/local row (mean ± sd)")
    parser.add_argument("--config", type=Path, default=None, help="a preset (simulations/configs/*.toml)")
    parser.add_argument("--scale-clients", default="10,100", help="client counts of the scale part")
    parser.add_argument("--scale-users", type=int, default=400, help="users in all, for the scale part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False
    sources = Sources(cache_dir=default_cache_dir(), offline=False)
    tmp = Path(tempfile.mkdtemp(prefix="fedrec-fed-bench-"))
    meta = {"scale": args.label, "overrides": args.overrides,
            "machine": f"{platform.machine()} {platform.processor()} {psutil.cpu_count()} cores".strip()}
    parts = args.parts.split(",")
    if parts == ["plot"]:
        print(write_plot())
        return
    eps_list = [float(e) for e in args.eps.split(",")]
    if "noise" in parts:
        save_rows(noise_rows(), "noise", meta)
    for i, eps in enumerate(eps_list):
        variants = args.variants.split(",")

        def privacy(variant: str, eps: float = eps) -> list[dict]:
            return over_seeds(lambda o: run_privacy(o, eps, variant, sources, tmp, args.config),
                              args.overrides, args.seeds, args.config)

        def local(eps: float = eps) -> list[dict]:
            return over_seeds(lambda o: run_local(o, eps, sources, tmp, args.config), args.overrides,
                              args.seeds, args.config)

        if "privacy" in parts:
            save_rows(privacy(variants[0]), "rows", meta)
        if "local" in parts:
            save_rows(local(), "rows", meta)
        if "privacy" in parts:
            for variant in variants[1:]:
                save_rows(privacy(variant), "rows", meta)
        if "scale" in parts and i == 0:  # after the headline rows, before the rest of the sweep
            for n in (int(c) for c in args.scale_clients.split(",")):  # each row saved when done
                save_rows([run_scale(args.overrides, n, args.scale_users, sources, tmp)], "scale_rows", meta)
    write_plot()
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
