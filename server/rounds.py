"""The federated run, Flower-free: the prior release, the training rounds, evaluation, checkpoints
and the run's records. It talks to the clients only through a `Transport` (server/app.py wraps
Flower's Grid; the tests use an in-memory one).

The round loop is ours (Flower's `Strategy.start` cannot resume); every round ends with a
checkpoint (server/checkpoints.py), and a resumed run keeps its run id, so a client asked again
for a round it already answered re-sends its stored reply instead of spending budget twice.

Faults: a round waits for every client, or for `fed.min_clients` of them after `fed.join_wait`
seconds, and aggregates only if at least that quorum answered. With `fed.secagg` the round runs
under SecAgg+ (server/secagg.py) and the server sees only the weighted mean of the adapters.
Everything a client sends is checked before it is used (server/validation.py): its name and
identity, its adapter against the global one's spec, its tensors against the digest in its ledger
line, its released statistics and metrics against what its ledger line allows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fedrec.common import wire
from fedrec.common.config import Config, to_dict
from fedrec.common.errors import AdapterError, ConfigError
from fedrec.common.evaluation import BLEND_WEIGHTS
from fedrec.common.ledger import MECHANISM_COOCCURRENCE, MECHANISM_DP_SGD, MECHANISM_POPULARITY
from fedrec.common.lora import save_adapter, tensors_digest, validate_adapter
from fedrec.common.prior import CollaborativePrior, head_items
from fedrec.common.recommender import Loaded
from fedrec.common.rundir import AdapterRecord, RunDir, atomic_write_json
from fedrec.common.wire import EvalRequest, Reply, RoundRequest
from fedrec.server import evaluation, ledgers
from fedrec.server.checkpoints import (
    ServerState,
    start_or_resume,
    write_checkpoint,
    write_failed,
    write_prior,
    write_records,
)
from fedrec.server.report import write_reports
from fedrec.server.strategies import make_strategy
from fedrec.server.transport import Batch, Request, Tensors, Transport
from fedrec.server.validation import Identities, check_release, check_weight

log = logging.getLogger(__name__)
WAIT_LOG_EVERY = 5.0  # seconds between the lines that say which clients the run still waits for


# --- the nodes of a round ----------------------------------------------------------------------


def quorum(cfg: Config, num_clients: int) -> int:
    """How many clients a round needs: fed.min_clients (capped at num_clients), else all."""
    return min(cfg.fed.min_clients or num_clients, num_clients)


def wait_for_nodes(transport: Transport, cfg: Config, num_clients: int, *, poll: float = 1.0) -> list[int]:
    """The connected nodes: all num_clients, or at least the quorum once fed.join_wait has passed;
    while waiting, a line every few seconds says how many are there and what the run needs."""
    need, start, said = quorum(cfg, num_clients), time.monotonic(), -math.inf
    while True:
        nodes = sorted(transport.nodes())
        waited = time.monotonic() - start
        if len(nodes) >= num_clients or (len(nodes) >= need and waited >= cfg.fed.join_wait):
            if len(nodes) < num_clients:
                log.warning("going ahead with %d of %d clients (fed.min_clients=%d) after %.0f s",
                            len(nodes), num_clients, need, waited)
            return nodes
        if waited - said >= WAIT_LOG_EVERY:
            alternative = (f"; or fed.min_clients={need} after fed.join_wait={cfg.fed.join_wait:g} s"
                           if need < num_clients else "")
            log.info("waiting for SuperNodes: %d of %d connected; the run needs fed.clients=%d (or "
                     "num-clients in the run config)%s", len(nodes), num_clients, num_clients, alternative)
            said = waited
        time.sleep(poll)


def settled_node_count(transport: Transport, wait: float, *, settle: float = 1.0, poll: float = 0.2) -> int:
    """How many nodes the federation has, for a run that was not told (run config num-clients = 0):
    their number once at least one is connected and none has joined for `settle` seconds (Flower's
    simulation registers all its SuperNodes at once, just after the ServerApp starts); `wait`
    seconds at most for the first one, with a line every few seconds while none is there."""
    start = changed = time.monotonic()
    count, said = 0, -math.inf
    while True:
        now = len(transport.nodes())
        if now != count:
            count, changed = now, time.monotonic()
        waited = time.monotonic() - start
        if count and time.monotonic() - changed >= settle:
            log.info("the federation has %d SuperNodes: each is one institution", count)
            return count
        if not count and waited > wait:
            raise ConfigError(f"no SuperNode connected in {wait:g} s (fed.join_wait); start the "
                              "institutions' SuperNodes, or set num-clients in the run config")
        if not count and waited - said >= WAIT_LOG_EVERY:
            log.info("waiting for SuperNodes: none connected yet (num-clients = 0 takes every SuperNode "
                     "of the federation; fed.join_wait=%g s)", wait)
            said = waited
        time.sleep(poll)


def enough(cfg: Config, rnd: int, answered: int, num_clients: int) -> bool:
    """A round aggregates only if at least the quorum of clients answered (trained or refused)."""
    need = quorum(cfg, num_clients)
    if answered < need:
        log.warning("round %d: %d of the %d clients needed answered; the global adapter is unchanged",
                    rnd, answered, need)
    return answered >= need


# --- replies ---------------------------------------------------------------------------------------


def accept(batch: Batch, identities: Identities, rnd: int, *, spec: Mapping[str, Any] | None = None,
           weight_key: str | None = None, secure: bool = False) -> tuple[list[Reply], list[str]]:
    """The replies that pass, and the batch's failures with one line for each that does not: a
    bad or impersonated name, an adapter not of `spec`, tensors that do not match the digest in
    the reply's ledger line (not checkable under SecAgg+: the server never sees them), a training
    reply without a usable weight."""
    replies: list[Reply] = []
    failures = list(batch.failures)
    for node, reply in batch.replies:
        problem = identities.claim(reply.client, node)
        if problem is None and not secure:
            problem = _content_problem(reply, spec)
        if problem is None and weight_key is not None and reply.ok:
            problem = _named(reply, check_weight(reply.metrics, weight_key))
        if problem is not None:
            failures.append(problem)
            log.warning("round %d: %s", rnd, problem)
            continue
        replies.append(reply)
    return replies, failures


def _content_problem(reply: Reply, spec: Mapping[str, Any] | None) -> str | None:
    if spec is not None and (reply.ok or reply.tensors):  # a training reply: the adapter, as sent
        try:
            validate_adapter(reply.tensors, spec, source=reply.client)
        except AdapterError as exc:
            return f"{reply.client}: {exc}"
    if reply.ledger is not None and ledgers.released_digest(reply.ledger) != tensors_digest(reply.tensors):
        return f"{reply.client}: the released tensors do not match the digest in its ledger line"
    return None


def _named(reply: Reply, problem: str | None) -> str | None:
    return None if problem is None else f"{reply.client}: {problem}"


def sum_releases(replies: Sequence[Reply], key: str, mechanism: str, kept: ledgers.Ledgers, *,
                 accountant: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray | None, float]:
    """Σ over clients of one released statistic, and the per-entry std of its noise (√Σ (σ·clip)²,
    from the ledger lines); a reply of the wrong shape, non-finite or unbounded is left out. The
    ledger line of each release summed joins `kept`."""
    total: np.ndarray | None = None
    variance = 0.0
    for r in replies:
        if not r.ok:
            log.warning("%s release: %s %s: %s", mechanism, r.client, r.status, r.reason)
            continue
        value = r.tensors.get(key)
        array = value.numpy().astype(np.float64) if value is not None else None
        expected = shape if shape is not None else (total.shape if total is not None else None)
        line = ledgers.ledger_line(0, mechanism, r, accountant)
        problem = check_release(array, key=key, shape=expected, line=line, ndim=len(shape) if shape else 1)
        if problem is not None or array is None:
            log.warning("%s release: %s failed: %s; left out of the sum", mechanism, r.client, problem)
            continue
        total = array if total is None else total + array
        variance += ledgers.noise_std(line) ** 2
        kept.setdefault(r.client, []).append(line)
    return total, math.sqrt(variance)


@dataclass
class RoundOutcome:
    """What one training round brought: the accepted replies, the failures, the new adapter."""

    replies: list[Reply]
    failures: list[str]
    merged: Tensors | None  # the strategy's new global adapter; None: unchanged
    bytes_down: int  # per client


# --- the run -------------------------------------------------------------------------------------


def run_server(transport: Transport, cfg: Config, out: Path, *, num_clients: int, resume: bool,
               loaded: Loaded) -> dict[str, Any]:
    """Run (or resume) the federated rounds; write the run directory; return the final metrics
    (or {"failed": reason} when a round trained no client)."""
    return Coordinator(transport, cfg, RunDir(out), num_clients=num_clients, loaded=loaded).run(resume)


class Coordinator:
    """One federated run: what it asks the clients, what it keeps of their answers, what it writes."""

    def __init__(self, transport: Transport, cfg: Config, run: RunDir, *, num_clients: int,
                 loaded: Loaded) -> None:
        self.transport, self.cfg, self.run_dir, self.num_clients = transport, cfg, run, num_clients
        self.loaded, self.initial = loaded, loaded.initial_adapter
        self.trainable = sorted(k for k in self.initial if cfg.lora.variant != "ffa" or "lora_B" in k)
        self.spec = {k: (tuple(self.initial[k].shape), self.initial[k].dtype) for k in self.trainable}
        self.current: Tensors = {k: self.initial[k] for k in self.trainable}
        self.strategy = make_strategy(cfg)
        self.model_bytes = sum(p.numel() * p.element_size() for p in loaded.base.model.parameters())
        self.identities = Identities()  # name <-> node id, for this server process
        self.state = ServerState(run_id="")

    def run(self, resume: bool) -> dict[str, Any]:
        """Round 0 (the prior release) unless done, the rounds not yet checkpointed, the end."""
        checkpoint = start_or_resume(self.run_dir, self.cfg, resume, spec=self.spec, strategy=self.strategy)
        self.state = checkpoint.state
        self.run_dir.failed.unlink(missing_ok=True)
        if checkpoint.adapter:
            self.current = checkpoint.adapter
            log.info("resuming run %s after round %d", self.state.run_id, self.state.round)
        if self.cfg.prior.enabled and self.state.prior is None:
            self.state.prior = self.release_prior()
            write_records(self.run_dir, self.state)
            if self.state.prior is not None:  # the release survives a crash in round 1
                write_checkpoint(self.run_dir, self.state)
        for rnd in range(self.state.round + 1, self.cfg.fed.rounds + 1):
            if (failed := self.train_round(rnd)) is not None:
                return failed
        final = self.finish()
        write_reports(self.run_dir.root, self.cfg)
        return final

    # --- round 0: the private collaborative prior ---

    def release_prior(self) -> CollaborativePrior | None:
        """Round 0, once: every client releases noisy popularity; the server sums it, picks the head
        (the most popular items by noisy count: post-processing), and every client releases its
        noisy co-occurrence over that head; the sums are the global prior."""
        config = self._round_request(0).to_config()
        popularity, _ = self._sum(self._query(Request(wire.QUERY_PRIOR, config)), wire.COUNTS,
                                  MECHANISM_POPULARITY)
        if popularity is None:
            return None
        no_head = CollaborativePrior(popularity, np.empty(0, np.int64), None)
        if not self.cfg.prior.cooccurrence:
            return no_head
        head = head_items(popularity, self.cfg.prior.head_size)
        replies = self._query(Request(wire.QUERY_COOCCURRENCE, config, head=head))
        matrix, noise_std = self._sum(replies, wire.COOCCURRENCE, MECHANISM_COOCCURRENCE,
                                      shape=(len(head),) * 2)
        return CollaborativePrior(popularity, head, matrix, noise_std) if matrix is not None else no_head

    def _query(self, request: Request) -> list[Reply]:
        batch = self.transport.send(request, self._nodes())
        return accept(batch, self.identities, 0)[0]

    def _sum(self, replies: Sequence[Reply], key: str, mechanism: str,
             shape: tuple[int, ...] | None = None) -> tuple[np.ndarray | None, float]:
        return sum_releases(replies, key, mechanism, self.state.ledgers,
                            accountant=self.cfg.privacy.accountant, shape=shape)

    # --- rounds 1..n: training ---

    def train_round(self, rnd: int) -> dict[str, Any] | None:
        """One round: train, aggregate, validate, checkpoint; {"failed": why} if no client trained."""
        t0 = time.perf_counter()
        request = self.strategy.configure_train(self._round_request(rnd))
        nodes = self._nodes()  # all clients, or the quorum after fed.join_wait
        outcome = self._secure_round(rnd, request, nodes) if self.cfg.fed.secagg else \
            self._plain_round(rnd, request, nodes)
        trained = [r for r in outcome.replies if r.ok]
        if not trained:
            return no_client_trained(self.run_dir, rnd, outcome.replies, outcome.failures)
        if outcome.merged is not None:
            self.current = {k: outcome.merged[k].to(self.initial[k].dtype) for k in self.trainable}
        for r in trained:
            if ledgers.has_line(r):
                self.state.ledgers.setdefault(r.client, []).append(
                    ledgers.ledger_line(rnd, MECHANISM_DP_SGD, r, self.cfg.privacy.accountant))
        due = rnd % self.cfg.fed.eval_every == 0 or rnd == self.cfg.fed.rounds  # the last round always
        valid = self.evaluate(wire.VALID, rnd=rnd) if due else evaluation.skipped()
        record = self._record(rnd, outcome, trained, valid, seconds=time.perf_counter() - t0)
        self.state.history.append(record)
        self.state.round = rnd
        write_checkpoint(self.run_dir, self.state, self.current, self.strategy.state_dict())
        write_records(self.run_dir, self.state)
        self._progress(record)
        return None

    def _plain_round(self, rnd: int, request: RoundRequest, nodes: Sequence[int]) -> RoundOutcome:
        """Every client's adapter reaches the server; the strategy aggregates those that trained."""
        # the clients train the LLM on the residual of this prior's CF score
        prior = self.state.prior.tensors() if self.state.prior is not None else None
        sent = Request(wire.TRAIN, request.to_config(), adapter=self.current, prior=prior)
        batch = self.transport.send(sent, nodes)
        replies, failures = accept(batch, self.identities, rnd, spec=self.spec,
                                   weight_key=self.strategy.weight_key)
        trained = [r for r in replies if r.ok]
        bytes_down = sum(t.numel() * t.element_size() for t in self.current.values())
        if not enough(self.cfg, rnd, len(replies), self.num_clients) or not trained:
            return RoundOutcome(replies, failures, None, bytes_down)
        return RoundOutcome(replies, failures, self.strategy.aggregate_train(rnd, self.current, trained),
                            bytes_down)

    def _secure_round(self, rnd: int, request: RoundRequest, nodes: Sequence[int]) -> RoundOutcome:
        """SecAgg+: the server unmasks only the weighted mean, then applies the strategy's update to it."""
        sent = Request(wire.TRAIN, request.to_config(), adapter=self.current)
        batch = self.transport.secure_train(sent, nodes, self.strategy.weight_key)
        replies, failures = accept(batch, self.identities, rnd, secure=True)
        bytes_down = batch.bytes_down // max(1, len(nodes))
        if batch.mean is None or not enough(self.cfg, rnd, len(replies), self.num_clients):
            return RoundOutcome(replies, failures, None, bytes_down)
        try:
            validate_adapter(batch.mean, self.spec, source="the secure aggregate")
        except AdapterError as exc:
            return RoundOutcome(replies, [*failures, str(exc)], None, bytes_down)
        merged = self.strategy.update(rnd, self.current, batch.mean)
        return RoundOutcome(replies, failures, merged, bytes_down)

    def _record(self, rnd: int, outcome: RoundOutcome, trained: Sequence[Reply], valid: dict[str, Any],
                *, seconds: float) -> dict[str, Any]:
        """The round's line of rounds.jsonl; each refusal also logged with its reason."""
        for r in outcome.replies:
            if not r.ok:
                log.warning("round %d: %s %s: %s", rnd, r.client, r.status, r.reason)
        return {
            "round": rnd, "clients_ok": len(trained),
            "clients_refused": sorted(r.client for r in outcome.replies if not r.ok),  # any refusal
            "clients_failed": outcome.failures, "aggregated": outcome.merged is not None,
            # clients send no loss (it is not a release); kept for clients that do
            "loss": _mean([r.metrics[wire.LOSS] for r in trained if wire.LOSS in r.metrics]),
            "valid": valid, "epsilon": {r.client: r.metrics.get(wire.EPSILON, 0.0) for r in outcome.replies},
            "bytes_up_per_client": _mean([r.bytes_up for r in trained]),
            "bytes_down_per_client": outcome.bytes_down, "model_bytes": self.model_bytes,
            "secagg": self.cfg.fed.secagg, "seconds": round(seconds, 3),
        }

    # --- evaluation ---

    def evaluate(self, which: str, *, with_prior: bool = True, betas: Sequence[float] | None = None,
                 rnd: int | None = None) -> dict[str, Any]:
        """Federated evaluation: each client scores its own users (with the prior's blend weights,
        or the LLM alone); means weighted by user count. Each answer is a DP release whose ledger
        line is kept."""
        prior = self.state.prior if with_prior else None
        if betas is None:
            tuned = BLEND_WEIGHTS if self.cfg.prior.tune_weight else (self.cfg.prior.weight,)
            betas = tuned if prior is not None else ()
        request = EvalRequest(split=which, round=self.state.round if rnd is None else rnd,
                              run_id=self.state.run_id, weights=tuple(float(b) for b in betas))
        sent = Request(wire.EVALUATE, request.to_config(), adapter=self.current,
                       prior=prior.tensors() if prior is not None else None)
        replies, _ = accept(self.transport.send(sent, self._nodes()), self.identities, request.round)
        for r in replies:
            if r.ok and r.ledger is not None:
                ledgers.keep_line(self.state.ledgers, r.client, r.ledger)
        return evaluation.pool(replies, betas, which)

    # --- the end: test metrics, the final adapter ---

    def finish(self) -> dict[str, Any]:
        """Test metrics at the blend weight chosen on the last validation, the full adapter."""
        key = wire.metric_key(wire.NDCG, self.cfg.eval.ks[0])
        evaluated = [r for r in self.state.history if r["valid"]["metrics"]]
        last: dict[str, Any] = evaluated[-1]["valid"] if evaluated else {"metrics": {}, "betas": []}
        noise = ledgers.validation_noise(self.state.ledgers, evaluated[-1]["round"], last) \
            if evaluated else 0.0
        weight = evaluation.choose_released_weight(last, key, noise)
        if self.state.prior is not None:  # the blend and CF alone (w = 0) in one pass, then the LLM alone
            test = self.evaluate(wire.TEST, betas=evaluation.test_weights(weight))
            alone = self.evaluate(wire.TEST, with_prior=False)
            final: dict[str, Any] = {
                "test": {k: v[0] for k, v in test["metrics"].items()},
                "test_cf_only": {k: v[-1] for k, v in test["metrics"].items()},
                "test_llm_only": {k: v[0] for k, v in alone["metrics"].items()},
                "blend_weight": weight, "cf": {"beta": self.cfg.prior.beta, "shrink": self.cfg.prior.shrink},
            }
        else:
            test = self.evaluate(wire.TEST)
            final = {"test": {k: v[0] for k, v in test["metrics"].items()}, "blend_weight": None}
        final |= {"test_users": test["users"], "rounds": self.state.round}
        self._save_final(final)
        return final

    def _save_final(self, metrics: dict[str, Any]) -> None:
        """final/: the full adapter with its AdapterRecord, the prior, the metrics; the records."""
        art = self.run_dir.final()
        record = AdapterRecord(config=to_dict(self.cfg), model_fingerprint=self.loaded.base.fingerprint,
                               dataset_fingerprint="",  # the server holds no data
                               run=self.state.run_id, rounds=self.state.round, variant=self.cfg.lora.variant)
        metadata = {"run_id": record.run, "rounds": str(record.rounds), "variant": record.variant}
        save_adapter(art.adapter, {**self.initial, **self.current}, metadata | record.to_metadata())
        if self.state.prior is not None:
            write_prior(art.prior, self.state.prior)
        atomic_write_json(art.metrics, metrics)
        write_records(self.run_dir, self.state)  # the test evaluation's ledger lines

    # --- helpers ---

    def _round_request(self, rnd: int) -> RoundRequest:
        return RoundRequest(run_id=self.state.run_id, round=rnd, num_rounds=self.cfg.fed.rounds,
                            local_epochs=self.cfg.fed.local_epochs, lr=self.cfg.train.lr)

    def _nodes(self) -> list[int]:
        return wait_for_nodes(self.transport, self.cfg, self.num_clients)

    def _progress(self, record: Mapping[str, Any]) -> None:
        key = wire.metric_key(wire.NDCG, self.cfg.eval.ks[0])
        _, top = evaluation.best(record["valid"], key)
        eps = record["epsilon"]
        # clients report no training loss (not a release), and they release their validation
        # metrics under their own policy (DP-noised by default): the line says so
        log.info("round %d/%d: %d clients trained, %d refused, %d failed; valid %s as released %.4f; "
                 "ε max %.3f; %.1f s", record["round"], self.cfg.fed.rounds, record["clients_ok"],
                 len(record["clients_refused"]), len(record["clients_failed"]), key, top,
                 max(eps.values()) if eps else 0.0, record["seconds"])


def no_client_trained(run: RunDir, rnd: int, replies: Sequence[Reply],
                      failures: Sequence[str]) -> dict[str, Any]:
    """Stop the run with one line saying why (failed.json): nothing was trained, so there is
    nothing to serve; returns {"failed": that line}."""
    why = [f"{r.client}: {r.status} ({r.reason})" for r in replies] + list(failures)
    reason = (f"round {rnd}: no client trained ({len(replies)} refused, {len(failures)} failed): "
              + ("; ".join(why)[:600] or "no replies"))
    log.error("%s", reason)
    write_failed(run, rnd, reason)
    return {"failed": reason}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0
