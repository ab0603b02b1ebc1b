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
        assert status["every release under DP"] == status["secret randomness"] == "pass"
        assert status["q is the public sample rate"] == "pass"
        # prior, then per round training and its (DP-noised, accounted) validation, then the test
        assert c["rounds"] == [0, 1, 1, 2, 2, 2] and c["remaining"] >= 0
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
    rewrite(path, read_jsonl(path)[:2])  # the round-2 entry dropped from the end

    assert main(["audit", str(run)]) == 1

    err = capsys.readouterr().err
    assert "ledgers/client-0.jsonl is missing" in err
    assert "rounds [2] were trained" in err


def test_client_state_and_bare_ledgers_are_audited(run_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"  # a ledger written before chains: readable, reported unchained
    rewrite(old, [{k: v for k, v in e.items() if k not in chain.CHAIN_FIELDS}
                  for e in read_jsonl(run_dir / "ledgers" / "client-0.jsonl")])
    out = tmp_path / "a.json"

    code = main(["audit", str(run_dir / "clients" / "client-0"), str(old), "--output", str(out)])

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
    assert "[client-1]: secret randomness" in err and "[client-0]: secret randomness" not in err


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
    from fedrec.simulations.audit import RunRecord, _context

    record = RunRecord("r", 8.0, {"a": 1.0}, "rdp", False, True, True, "users", 8)
    rounds = [{"round": 1, "epsilon": {"a": 0.5, "b": 3.0}, "clients_refused": ["a"]},
              {"round": 2, "epsilon": {"a": 0.5, "b": 5.0}, "clients_refused": ["a"]}]

    a, b = _context("a", rounds, record, None), _context("b", rounds, record, None)

    assert a.trained_rounds == () and a.budget == 1.0
    assert b.trained_rounds == (1, 2) and b.round_epsilon == {1: 3.0, 2: 5.0} and b.budget == 8.0
