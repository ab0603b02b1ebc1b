"""`fedrec audit` on a real federated simulation: it passes, and fails once a ledger line is edited."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from fedrec.cli import main
from fedrec.common import chain
from fedrec.common.rundir import read_jsonl

from tests.conftest import write_tiny_dataset
from tests.simulations.test_federated import simulate_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 3-client, 2-round simulation (prior release + DP-SGD), shared by the tests below."""
    root = tmp_path_factory.mktemp("audit")
    data = write_tiny_dataset(root / "data")
    out = root / "run"
    assert main(simulate_args(data, out, root / "cache", "fed.rounds=2")) == 0
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def rewrite(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


def test_audit_of_a_real_run_passes(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.json"

    assert main(["audit", str(run_dir), "--output", str(out)]) == 0

    report = json.loads(out.read_text())
    assert report["passed"] and report["failures"] == []
    clients = report["targets"][0]["clients"]
    assert [c["client"] for c in clients] == ["client-0", "client-1", "client-2"]
    for c in clients:
        status = {x["name"]: x["status"] for x in c["checks"]}
        assert status["hash chain"] == status["ε re-derived"] == status["within budget"] == "pass"
        assert status["rounds complete"] == status["server copy = client's own ledger"] == "pass"
        assert status["released tensors match the ledger"] == "pass"
        assert status["every release under DP"] == "pass"
        assert status["q is the public sample rate"] == "pass"
        # the two prior releases, then per round training and its (DP-noised, accounted)
        # validation, then the two test evaluations (the blend and CF alone; the LLM alone)
        assert c["rounds"] == [0, 0, 1, 1, 2, 2, 2, 2] and c["remaining"] >= 0
        assert set(c["final_epsilon"]) == {"opacus-rdp", "opacus-prv", "dp-accounting-rdp", "dp-accounting-pld"}
        assert c["agreement"] < 0.01
    assert any(k.endswith("ledgers/client-0.jsonl") for k in report["checksums"])
    assert report["versions"]["dp-accounting"] != "not installed"


def test_lowering_one_epsilon_fails_the_audit(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    path = run / "ledgers" / "client-1.jsonl"
    lines = read_jsonl(path)
    lines[1]["epsilon"] = lines[1]["epsilon"] / 2
    rewrite(path, lines)

    assert main(["audit", str(run), "--format", "md"]) == 1

    err = capsys.readouterr().err
    assert "audit FAILED" in err
    assert "[client-1]: hash chain" in err and "[client-1]: ε re-derived" in err
    assert "client-0" not in err and "client-2" not in err


def test_rehashed_forgery_is_caught_by_the_other_records(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    path = run / "ledgers" / "client-2.jsonl"
    forged: list[dict] = []
    for e in read_jsonl(path):  # lower round 2's DP-SGD ε and rebuild the whole chain consistently
        last = e["mechanism"] == "dp-sgd" and e["round"] == 2
        forged.append(chain.link({**e, "epsilon": e["epsilon"] * (0.5 if last else 1)}, forged))
    rewrite(path, forged)

    assert main(["audit", str(run), "--format", "json"]) == 1

    err = capsys.readouterr().err
    assert "hash chain" not in err  # the forged chain is self-consistent...
    assert "server copy = client's own ledger" in err and "rounds complete" in err  # ...but not the run


def test_deleted_ledger_and_missing_round_fail(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    (run / "ledgers" / "client-0.jsonl").unlink()
    path = run / "ledgers" / "client-1.jsonl"
    lines = read_jsonl(path)
    last = max(i for i, e in enumerate(lines) if e["mechanism"] == "dp-sgd")
    rewrite(path, lines[:last])  # the round-2 release (and the evaluations after it) dropped

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "ledgers/client-0.jsonl is missing" in err
    assert "rounds [2] were trained" in err


def test_client_state_and_bare_ledgers_are_audited(run_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"  # a ledger written before chains: readable, reported unchained
    rewrite(old, [{k: v for k, v in e.items() if k not in chain.CHAIN_FIELDS + chain.SIGNATURE_FIELDS}
                  for e in read_jsonl(run_dir / "ledgers" / "client-0.jsonl")])
    out = tmp_path / "a.json"

    code = main(["audit", str(run_dir / "clients" / "client-0"), str(old), "--output", str(out),
                 "--allow-legacy"])  # an unchained ledger now FAILs without it

    assert code == 0
    report = json.loads(out.read_text())
    state, bare = report["targets"]
    assert state["kind"] == "client-state" and bare["kind"] == "ledger"
    assert {x["name"]: x["status"] for x in bare["clients"][0]["checks"]}["hash chain"] == "warn"


def test_a_run_without_dp_or_with_seeded_noise_fails(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("dp = true", "dp = false"))
    for name in ("client-0", "client-1"):
        for path in (run / "ledgers" / f"{name}.jsonl", run / "clients" / name / "ledger.jsonl"):
            lines: list[dict] = []
            for e in read_jsonl(path):  # a consistent rewrite of both copies
                rng = "seeded (deterministic, NOT private)" if name == "client-1" else e["rng"]
                lines.append(chain.link({**e, "rng": rng}, lines))
            rewrite(path, lines)

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "[client-2]: every release under DP: the run was configured with fed.dp = false" in err
    assert "[client-1]: randomness" in err and "[client-0]: randomness" not in err


def test_bad_input_is_one_clean_line(tmp_path: Path, capsys) -> None:
    assert main(["audit", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedrec: error:") and err.count("\n") == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"round": 0}\n{not json\n')
    assert main(["audit", str(broken)]) == 2
    assert "broken.jsonl:2" in capsys.readouterr().err


def test_html_report_renders_with_its_plots(run_dir: Path, tmp_path: Path) -> None:
    html = tmp_path / "audit.html"
    assert main(["audit", str(run_dir), "--output", str(html)]) == 0
    text = html.read_text()
    assert text.count("<svg") == 3 and "budget" in text and "Sign-off" in text
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); HTML checked as text only")
    png = tmp_path / "audit.png"

    subprocess.run([str(REPO / "simulations" / "render_report.sh"), str(html), str(png), "1280x1400"],
                   check=True, capture_output=True, timeout=120)

    width, height, pixels = read_png(png)
    assert (width, height) == (1280, 1400)
    colours = {pixels[i:i + 3] for i in range(0, len(pixels), 4 if len(pixels) == width * height * 4 else 3)}
    for hex_colour in ("d62728", "9467bd", "ff7f0e"):  # budget line, PLD and dp-accounting RDP series
        assert bytes.fromhex(hex_colour) in colours, hex_colour


def read_png(path: Path) -> tuple[int, int, bytes]:
    """Width, height and raw RGB(A) rows of a non-interlaced 8-bit PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 4 if colour == 6 else 3
    raw, stride, out, prev = zlib.decompress(idat), width * bpp, bytearray(), bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bytes(out)


def test_refused_rounds_are_not_expected_in_the_ledger() -> None:
    from fedrec.client.audit.sources import RunRecord, _context

    record = RunRecord("r", 8.0, {"a": 1.0}, "rdp", False, True, True, "users", 8)
    rounds = [{"round": 1, "epsilon": {"a": 0.5, "b": 3.0}, "clients_refused": ["a"]},
              {"round": 2, "epsilon": {"a": 0.5, "b": 5.0}, "clients_refused": ["a"]}]

    a, b = _context("a", rounds, record, None), _context("b", rounds, record, None)

    assert a.trained_rounds == () and a.budget == 1.0
    assert b.trained_rounds == (1, 2) and b.round_epsilon == {1: 3.0, 2: 5.0} and b.budget == 8.0


# --- issue 13: forged, stripped, truncated and rewritten records ----------------------------


def all_copies(run: Path, client: str) -> list[Path]:
    return [run / "ledgers" / f"{client}.jsonl", run / "clients" / client / "ledger.jsonl"]


def rewrite_state_ledger(run: Path, client: str, lines: list[dict]) -> None:
    path = run / "clients" / client / "state.json"
    state = json.loads(path.read_text())
    state["ledger"] = lines
    path.write_text(json.dumps(state))


def test_a_real_runs_ledgers_are_signed_and_verify_against_the_institutions_key(
        run_dir: Path, tmp_path: Path) -> None:
    pub = run_dir / "clients" / "client-0" / "ledger.pub"
    head = chain.head(read_jsonl(run_dir / "clients" / "client-0" / "ledger.jsonl"))
    out = tmp_path / "a.json"

    assert main(["audit", str(run_dir), "--trust", f"client-0={pub}", "--expect-head", f"client-0={head}",
                 "--output", str(out)]) == 0

    clients = {c["client"]: {x["name"]: x["status"] for x in c["checks"]}
               for c in json.loads(out.read_text())["targets"][0]["clients"]}
    assert clients["client-0"]["ledger signatures"] == "pass"
    assert clients["client-0"]["chain head = expected"] == "pass"
    assert clients["client-1"]["ledger signatures"] == "warn"  # no --trust: self-asserted, said so
    assert clients["client-0"]["accountant state = ledger"] == "pass"


def test_forged_chain_in_both_copies_fails_on_its_signatures(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    forged: list[dict] = []
    for e in read_jsonl(run / "ledgers" / "client-2.jsonl"):  # σ raised, every hash recomputed
        body = {k: v for k, v in e.items() if k not in ("signature",)}
        linked = chain.link({**body, "noise_multiplier": e["noise_multiplier"] * 3}, forged)
        forged.append({**linked, "signer": e["signer"], "signature": e["signature"]})
        forged[-1]["entry_sha256"] = chain.entry_hash(forged[-1])
    for path in all_copies(run, "client-2"):
        rewrite(path, forged)
    rewrite_state_ledger(run, "client-2", forged)

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "[client-2]: ledger signatures" in err and "does not verify" in err


def test_a_resigned_forgery_fails_against_the_trusted_key(run_dir: Path, tmp_path: Path, capsys) -> None:
    trusted = tmp_path / "client-1.pub"  # what the privacy officer got from the institution
    trusted.write_bytes((run_dir / "clients" / "client-1" / "ledger.pub").read_bytes())
    run = copy_run(run_dir, tmp_path)
    own_key = chain.load_signer(chain.generate_key(tmp_path / "forger")[0])
    forged: list[dict] = []
    for e in read_jsonl(run / "ledgers" / "client-1.jsonl"):
        forged.append(chain.link({**e, "noise_multiplier": e["noise_multiplier"] * 3}, forged, signer=own_key))
    for path in all_copies(run, "client-1"):
        rewrite(path, forged)

    assert main(["audit", str(run), "--trust", f"client-1={trusted}"]) == 1

    assert "[client-1]: ledger signatures" in capsys.readouterr().err


def test_stripped_chain_in_both_copies_fails_unless_legacy(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    for path in all_copies(run, "client-0"):
        rewrite(path, [{k: v for k, v in e.items() if k not in chain.CHAIN_FIELDS + chain.SIGNATURE_FIELDS}
                       for e in read_jsonl(path)])

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "[client-0]: hash chain" in err and "[client-0]: ledger signatures" in err


def test_dropped_last_release_with_its_reply_still_stored_fails(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    for path in all_copies(run, "client-0"):
        lines = read_jsonl(path)
        last = max(i for i, e in enumerate(lines) if e["mechanism"] == "dp-sgd")
        rewrite(path, lines[:last])  # the round-2 release (and what followed) dropped from both copies...
    rewrite_state_ledger(run, "client-0", read_jsonl(run / "ledgers" / "client-0.jsonl"))
    rounds = read_jsonl(run / "rounds.jsonl")
    for r in rounds:
        if r["round"] == 2:
            del r["epsilon"]["client-0"]  # ...and from rounds.jsonl
    rewrite(run / "rounds.jsonl", rounds)
    assert (run / "clients" / "client-0" / "replies").is_dir()

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "[client-0]: released tensors match the ledger" in err and "has no ledger line" in err


def test_budget_rewritten_everywhere_fails_against_the_runs_config(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    key = chain.load_signer(run / "clients" / "client-1" / "ledger.key")  # the run dir's owner holds it
    resigned: list[dict] = []
    for e in read_jsonl(run / "ledgers" / "client-1.jsonl"):
        resigned.append(chain.link({**e, "budget": 100.0}, resigned, signer=key))
    for path in all_copies(run, "client-1"):
        rewrite(path, resigned)
    rewrite_state_ledger(run, "client-1", resigned)

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "[client-1]: budget fixed" in err and "config.toml" in err


def test_client_state_whose_accountant_disagrees_with_its_ledger_fails(run_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    state_dir = run / "clients" / "client-2"
    state = json.loads((state_dir / "state.json").read_text())
    state["accountant"]["history"] = state["accountant"]["history"][:-1]  # one release not composed
    (state_dir / "state.json").write_text(json.dumps(state))

    assert main(["audit", str(state_dir)]) == 1

    assert "accountant state = ledger" in capsys.readouterr().err


def test_a_run_configured_without_dp_fails(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(run_dir, tmp_path)
    config = (run / "config.toml").read_text()
    assert "dp = true" in config
    (run / "config.toml").write_text(config.replace("dp = true", "dp = false"))

    assert main(["audit", str(run)]) == 1

    assert "fed.dp = false" in capsys.readouterr().err


def test_trust_flags_are_checked(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["audit", str(run_dir), "--trust", "client-0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["audit", str(run_dir), "--trust", f"nobody={run_dir / 'clients/client-0/ledger.pub'}"]) == 1
    assert "--trust nobody" in capsys.readouterr().err
    assert main(["audit", str(run_dir), "--expect-head", "client-0=nothex"]) == 2
    assert "64 hex digits" in capsys.readouterr().err
    assert main(["audit", str(run_dir), "--expect-head", "client-0=" + "ab" * 32]) == 1
    assert "[client-0]: chain head = expected" in capsys.readouterr().err


def test_the_co_occurrence_release_is_re_derived_and_a_tampered_one_is_caught(
        run_dir: Path, tmp_path: Path, capsys) -> None:
    from fedrec.common.privacy.analysis import MechanismStep, epsilon
    from safetensors.torch import load_file, save_file

    lines = read_jsonl(run_dir / "clients" / "client-1" / "ledger.jsonl")
    cooc = [e for e in lines if e["mechanism"] == "prior-cooccurrence"]
    assert len(cooc) == 1 and cooc[0]["sample_rate"] == 1.0 and cooc[0]["steps"] == 1
    history = [MechanismStep(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"], steps=e["steps"]) for e in lines[:2]]
    assert cooc[0]["epsilon"] == pytest.approx(epsilon(history, delta=cooc[0]["delta"]), rel=1e-9)

    run = copy_run(run_dir, tmp_path)
    stored = [p for p in (run / "clients" / "client-1" / "replies").glob("*cooccurrence*")]
    assert len(stored) == 1
    tensors = load_file(str(stored[0]))
    tensors["cooccurrence"][0, 0] += 1.0  # the released matrix edited after the fact
    save_file(tensors, str(stored[0]))

    assert main(["audit", str(run)]) == 1
    assert "released tensors match the ledger" in capsys.readouterr().err
