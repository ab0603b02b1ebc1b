"""Deployment: `fedrec deploy init` and a real SuperLink with SuperNodes (TLS, node auth, SecAgg+, faults)."""

from __future__ import annotations

import ipaddress
import json
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from fedrec.cli import main
from fedrec.common.config import load_config
from fedrec.common.errors import ConfigError
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.rundir import package_versions, read_jsonl
from fedrec.server.deployment.generate import init_deployment
from fedrec.server.deployment.keys import make_node_keys
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from safetensors.torch import load_file

# --- deploy init (no processes) --------------------------------------------------------------


def institution_keys(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """Each institution runs `fedrec deploy keygen` on its own machine and sends the .pub files."""
    sent = tmp_path / "received-keys"
    for name in names:
        assert main(["deploy", "keygen", str(tmp_path / "sites" / name / "state"), "--name", name]) == 0
        (sent / name).mkdir(parents=True)
        for pub in ("supernode.pub", "ledger.pub"):
            (sent / name / pub).write_bytes((tmp_path / "sites" / name / "state" / pub).read_bytes())
    return sent


def test_deploy_init_writes_a_verifiable_pki_and_each_sites_own_settings(tmp_path: Path) -> None:
    root = tmp_path / "dep"
    keys = institution_keys(tmp_path, ("hospital-a", "clinic_b"))

    assert main(["deploy", "init", str(root), "--institutions", "hospital-a,clinic_b",
                 "--superlink", "fl.example.org:9443", "--site-root", "/srv/{name}",
                 "--epsilon-budget", "4", "--institution-keys", str(keys)]) == 0

    coord, site = root / "coordinator", root / "institutions" / "hospital-a"
    ca = x509.load_pem_x509_certificate((coord / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((coord / "superlink.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the chain is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # SuperNode keys: OpenSSH EC P-384 pairs the institution made; the coordinator holds the public half
    own = tmp_path / "sites" / "hospital-a" / "state"
    private = load_ssh_private_key((own / "supernode.key").read_bytes(), None)
    public = load_ssh_public_key((coord / "supernodes" / "hospital-a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert (own / "supernode.key").stat().st_mode & 0o077 == 0 and (own / "ledger.key").stat().st_mode & 0o077 == 0
    assert (root / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    assert (site / "supernode.pub").read_bytes() != (root / "institutions" / "clinic_b" / "supernode.pub").read_bytes()
    # no institution's private key on the coordinator's disk; its ledger key kept for `audit --trust`
    private_keys = {p.relative_to(root).as_posix() for p in root.rglob("*.key")}
    assert private_keys == {"ca/ca.key", "coordinator/superlink.key"}
    assert (coord / "ledger-keys" / "hospital-a.pub").read_bytes() == (own / "ledger.pub").read_bytes()
    # each site's own settings; none of them in what the coordinator submits
    settings = (site / "settings.toml").read_text()
    assert 'client-name = "hospital-a"' in settings and "epsilon-budget = 4.0" in settings
    assert 'data = "/srv/hospital-a/data"' in settings and 'state-dir = "/srv/hospital-a/state"' in settings
    run_sh = (coord / "run.sh").read_text()
    assert "epsilon-budget" not in run_sh and "/srv/" not in run_sh and "num-clients=2" in run_sh
    assert "--enable-supernode-auth" in (coord / "superlink.sh").read_text()
    sn = (site / "supernode.sh").read_text()
    assert "--auth-supernode-private-key" in sn and "--root-certificates" in sn and "fl.example.org:9443" in sn
    assert "/srv/hospital-a/state/supernode.key" in sn
    assert "register" in (coord / "register-supernodes.sh").read_text()
    readme = (site / "README.md").read_text()
    assert "What leaves this site" in readme and "runs the code it is sent" in readme
    assert "INSECURE" not in sn
    # the Control API shares the SuperLink's port: not bound to the public interface by default
    assert 'SUPERLINK_BIND:-127.0.0.1' in (coord / "superlink.sh").read_text()
    assert f'fedrec-version = "{package_versions(("fedrec",))["fedrec"]}"' in settings


def test_deploy_init_needs_the_institutions_public_keys_and_refuses_private_ones(tmp_path: Path, capsys) -> None:
    keys = institution_keys(tmp_path, ("a",))

    assert main(["deploy", "init", str(tmp_path / "d1"), "--institutions", "a", "--superlink", "h"]) == 2
    assert "--institution-keys" in capsys.readouterr().err
    (keys / "a" / "supernode.key").write_bytes(b"secret")  # the coordinator was sent a private key
    assert main(["deploy", "init", str(tmp_path / "d2"), "--institutions", "a", "--superlink", "h",
                 "--institution-keys", str(keys)]) == 2
    assert "holds a private key" in capsys.readouterr().err
    assert main(["deploy", "keygen", str(tmp_path / "sites" / "a" / "state")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_client_refuses_a_version_other_than_the_pinned_one() -> None:
    from fedrec.client.app import require_pinned_version

    require_pinned_version({"fedrec-version": package_versions(("fedrec",))["fedrec"]})
    require_pinned_version({})  # nothing pinned (simulated clients)
    with pytest.raises(ConfigError, match="version-conflict"):
        require_pinned_version({"fedrec-version": "0.0.0-other"})


def test_loopback_finds_flower_beside_the_interpreter(tmp_path: Path, dataset_writer) -> None:
    import sys

    from harness.loopback import Federation

    fed = Federation(tmp_path, ("a",), dataset_writer)

    assert fed.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert (Path(sys.executable).parent / "flower-superlink").exists()
    assert not list((tmp_path / "deploy").rglob("supernode.key"))


def test_insecure_mode_says_so_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    root = tmp_path / "dev"

    assert main(["deploy", "init", str(root), "--institutions", "a", "--superlink", "127.0.0.1",
                 "--insecure"]) == 0

    assert "INSECURE DEVELOPMENT MODE" in capsys.readouterr().err
    site = root / "institutions" / "a"
    assert "--insecure" in (site / "supernode.sh").read_text()
    assert "INSECURE DEVELOPMENT MODE" in (site / "README.md").read_text()
    assert not (site / "supernode.key").exists() and not (root / "coordinator" / "ca.pem").exists()
    assert main(["deploy", "init", str(root), "--institutions", "a", "--superlink", "h"]) == 2
    with pytest.raises(ConfigError, match="not a valid name"):
        init_deployment(tmp_path / "x", institutions=("a b",), superlink="h")
    assert main(["deploy", "init", str(tmp_path / "y"), "--institutions", "a", "--superlink", "h:99999"]) == 2


# --- a real federation -----------------------------------------------------------------------


def check_ledger(lines: list[dict[str, Any]]) -> None:
    """ε is what the accountant gives for the recorded mechanisms, and never decreases."""
    history = []
    for entry in lines:
        history.append(MechanismStep(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], steps=entry["steps"]))
        assert entry["epsilon"] == pytest.approx(epsilon(history, delta=entry["delta"]), rel=1e-9)
    assert [e["epsilon"] for e in lines] == sorted(e["epsilon"] for e in lines)


@pytest.mark.slow
def test_tls_authenticated_federation_runs_two_rounds(federation, tmp_path: Path) -> None:
    run = tmp_path / "run"

    federation.submit(run, "fed.rounds=2")
    federation.wait_for(run / "final" / "metrics.json", timeout=900)

    final = json.loads((run / "final" / "metrics.json").read_text())
    assert final["rounds"] == 2 and 0 <= final["test"]["ndcg@10"] <= 1
    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == [] and r["aggregated"] for r in rounds)
    assert set(rounds[-1]["epsilon"]) == {"a", "b", "c"}
    for name in ("a", "b", "c"):
        lines = read_jsonl(run / "ledgers" / f"{name}.jsonl")
        releases = [e["round"] for e in lines if e["mechanism"] in ("prior-counts", "prior-cooccurrence", "dp-sgd")]
        assert releases == [0, 0, 1, 2]  # two prior releases, then one DP-SGD line per round
        assert {e["mechanism"] for e in lines} <= {"prior-counts", "prior-cooccurrence", "dp-sgd", "dp-eval"}
        assert lines == federation.own_ledger(name)  # the coordinator's copy is the site's record
        check_ledger(lines)
    # the institutions' settings never reached the coordinator's run record
    record = (run / "config.toml").read_text() + (run / "run.json").read_text()
    assert str(federation.site("a")) not in record and "epsilon-budget" not in record
    assert (run / "report.md").is_file() and (run / "final" / "adapter.safetensors").is_file()
    # TLS: the SuperLink's certificate verifies against the federation's CA, not the system's
    assert federation.tls_handshake(federation.coordinator / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError):
        federation.tls_handshake(None)


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(federation) -> None:
    rogue = federation.root / "rogue.key"
    rogue.write_bytes(make_node_keys("rogue")[0])
    rogue.chmod(0o600)

    # site a's command with a key the SuperLink never registered (the later flag wins)
    proc = federation.start_supernode("a", "--auth-supernode-private-key", str(rogue), key="rogue")
    code = proc.wait(timeout=120)

    assert code != 0
    assert "Failed to activate SuperNode" in federation.log("rogue")


@pytest.mark.slow
def test_secagg_aggregate_equals_plain_fedavg_of_the_same_updates(federation, tmp_path: Path) -> None:
    run = tmp_path / "secagg"
    _restart_missing_nodes(federation)

    federation.submit(run, "fed.rounds=1 fed.secagg=true fed.secagg_max_weight=16.0 prior.enabled=false")
    federation.wait_for(run / "final" / "metrics.json", timeout=900)

    round1 = read_jsonl(run / "rounds.jsonl")[0]
    assert round1["secagg"] and round1["clients_ok"] == 3 and round1["aggregated"]
    secure = load_file(str(run / "checkpoints" / "round-1" / "adapter.safetensors"))
    # what the clients released (kept in their own state) and their weights (user counts)
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    replies = []
    for name in ("a", "b", "c"):
        state = json.loads((federation.site(name) / "state" / "state.json").read_text())
        answered = state["answered"][f"{run_id}/train/1"]
        tensors = load_file(str(federation.site(name) / "state" / "replies" / answered["file"]))
        users = answered["metrics"]["num-examples"]
        replies.append(RecordDict({"arrays": ArrayRecord(torch_state_dict=tensors),
                                   "metrics": MetricRecord({"num-examples": users})}))
    # what fed.secagg = false computes from the same replies: Flower's FedAvg, weighted by users
    plain = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()
    assert set(plain) == set(secure)
    # quantisation: 2·clip/2²² per value, scaled by max_weight/users (8 users: a factor 2)
    step = 2 * 8.0 / 2**22 * 16.0 / 8
    spread = max((replies[0]["arrays"].to_torch_state_dict()[k] - plain[k]).abs().max().item()
                 for k in plain)
    for key in plain:
        assert torch.allclose(secure[key], plain[key], atol=3 * step, rtol=0), key
    assert spread > 100 * step  # the clients differ far more than the tolerance: the check has teeth
    # the coordinator keeps each client's own chained ledger line, as without SecAgg+
    for name in ("a", "b", "c"):
        own = read_jsonl(federation.site(name) / "state" / "ledger.jsonl")
        copy = read_jsonl(run / "ledgers" / f"{name}.jsonl")
        assert copy and copy == [e for e in own if e.get("run_id") == run_id]
        assert all("entry_sha256" in e for e in copy)


def _restart_missing_nodes(federation) -> None:
    for name in ("a", "b", "c"):
        proc = federation.procs.get(name)
        if proc is None or proc.poll() is not None:
            federation.procs.pop(name, None)
            federation.start_supernode(name)


@pytest.mark.slow
def test_killed_supernode_and_restarted_superlink_lose_nothing(make_federation, tmp_path: Path) -> None:
    fed = make_federation()
    fed.start_superlink()
    fed.register()
    for name in ("a", "b", "c"):
        fed.start_supernode(name)
    run = tmp_path / "run"
    config = "fed.rounds=3 fed.min_clients=2 fed.join_wait=60.0 fed.eval_every=3 prior.enabled=false"
    fed.submit(run, config)

    # c dies as round 2 starts; the round completes with a and b (min_clients = 2)
    fed.wait_for(run / "checkpoints" / "round-1" / "server.json", timeout=600)
    fed.kill("c")
    fed.wait_for(run / "checkpoints" / "round-2" / "server.json", timeout=600)
    # the coordinator goes down between rounds (SuperLink and the ServerApp), then everything returns
    fed.kill("superlink")
    assert len(read_jsonl(run / "rounds.jsonl")) == 2
    fed.start_superlink()  # same database: the registered keys are still known
    fed.start_supernode("c")  # c rejoins with its own state
    fed.submit(run, config, "resume=true")
    fed.wait_for(run / "final" / "metrics.json", timeout=900)

    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients_ok"] == 3
    assert rounds[1]["clients_ok"] == 2 and rounds[1]["aggregated"] and "c" not in rounds[1]["epsilon"]
    [failure] = rounds[1]["clients_failed"]  # named by c's node id, not the SuperLink's (1)
    assert "Node Unavailable" in failure and not failure.startswith("node 1:")
    assert rounds[2]["clients_ok"] == 3  # c is back
    for name in ("a", "b"):
        lines = read_jsonl(run / "ledgers" / f"{name}.jsonl")
        assert sgd_rounds(lines) == [1, 2, 3]  # each round counted once across the restart
        assert lines == fed.own_ledger(name)
        check_ledger(lines)
    server_c = read_jsonl(run / "ledgers" / "c.jsonl")
    own_c = fed.own_ledger("c")
    check_ledger(own_c)
    assert sgd_rounds(server_c) == [1, 3]
    assert all(line in own_c for line in server_c)  # every release the server counted, c counted
    assert [r for r in sgd_rounds(own_c) if r != 2] == [1, 3]
    assert own_c[-1]["epsilon"] <= 50.0


def sgd_rounds(lines: list[dict]) -> list[int]:
    """The rounds of the DP-SGD releases (the DP-noised evaluations have lines of their own)."""
    return [e["round"] for e in lines if e["mechanism"] == "dp-sgd"]


def test_quorum_goes_ahead_without_a_missing_client_after_the_wait() -> None:
    from fedrec.server import rounds

    class Transport:
        def nodes(self) -> list[int]:
            return [1, 2]

    cfg = load_config(None, ["fed.min_clients=2", "fed.join_wait=0.2"])
    start = time.monotonic()

    nodes = rounds.wait_for_nodes(Transport(), cfg, 3)  # type: ignore[arg-type]

    assert nodes == [1, 2] and time.monotonic() - start >= 0.2
    assert rounds.quorum(cfg, 3) == 2 and rounds.quorum(load_config(None, []), 3) == 3
    assert not rounds.enough(cfg, 1, 1, 3) and rounds.enough(cfg, 1, 2, 3)
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(None, ["fed.min_clients=0"])


def test_supernode_command_reads_the_settings_file(tmp_path: Path) -> None:
    keys = institution_keys(tmp_path, ("a",))
    dep = init_deployment(tmp_path / "d", institutions=("a",), superlink="h:1", institution_keys=keys)
    done = subprocess.run(["bash", "-n", str(tmp_path / "d" / "institutions" / "a" / "supernode.sh")])
    assert done.returncode == 0 and dep.address == "h:1"
    assert '--node-config "$HERE/settings.toml"' in (tmp_path / "d" / "institutions" / "a" / "supernode.sh").read_text()
