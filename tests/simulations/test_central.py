"""End to end: `fedrec train-central` on a tiny CSV data set and a tiny local model."""

import json
from pathlib import Path

import pytest
from fedrec.cli import main
from fedrec.common import chain
from fedrec.common.evaluation import lead_z
from fedrec.common.privacy.analysis import MechanismStep, epsilon
from fedrec.common.rundir import read_jsonl


def test_train_central_writes_a_complete_run(tmp_path: Path, tiny_data: Path, tiny_model_dir: Path,
                                              capsys) -> None:
    data = tiny_data
    out = tmp_path / "run"
    args = ["train-central", "--data", str(data), "--model", str(tiny_model_dir), "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--offline",
            "--set", "data.max_users=0", "--set", "train.batch_size=8", "--set", "train.epochs=2",
            "--set", "train.dp_epochs=2", "--set", "prior.head_size=10", "--set", "privacy.target_epsilon=4"]

    assert main(args) == 0

    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert {"popularity", "dp-popularity", "itemknn", "dp-cooccurrence", "zero-shot", "central-lora",
            "central-dp-lora", "central-dp-lora-llm-only"} <= set(rows)
    assert all(0.0 <= r["ndcg@10"] <= r["hr@10"] <= 1.0 for r in rows.values())
    assert rows["central-dp-lora"]["epsilon"] <= 4.0 + 1e-6
    assert rows["popularity"]["epsilon"] is None
    for method in ("central-lora", "central-dp-lora"):
        assert (out / method / "final" / "adapter.safetensors").is_file()
        assert len(read_jsonl(out / method / "rounds.jsonl")) == 2  # two epochs, one line each
    ledger = read_jsonl(out / "ledgers" / "central-dp-lora.jsonl")
    history = []
    for entry in ledger:  # every reported ε is what the accountant gives for the recorded mechanism
        history.append(MechanismStep(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"], steps=entry["steps"]))
        assert entry["epsilon"] == pytest.approx(epsilon(history, delta=entry["delta"]), rel=1e-9)
    assert [e["mechanism"] for e in ledger[:2]] == ["prior-counts", "prior-cooccurrence"]
    assert [e["epsilon"] for e in ledger] == sorted(e["epsilon"] for e in ledger)
    assert "central-dp-lora" in capsys.readouterr().out
    assert "[train]" in (out / "config.toml").read_text()
    assert (out / "central-dp-lora" / "final" / "prior.safetensors").is_file()
    fused = rows["central-dp-lora"]  # the blend keeps CF alone and the LLM's contribution beside it
    assert fused["llm_contribution_ndcg@10"] == pytest.approx(fused["ndcg@10"] - fused["cf_only_ndcg@10"], abs=2e-5)
    assert rows["dp-cooccurrence"]["epsilon"] <= 4.0 + 1e-6
    # the blend weight is recorded with the validation leads it was chosen from, by the noise rule
    metrics = json.loads((out / "central-dp-lora" / "final" / "metrics.json").read_text())
    valid, weight = metrics["validation"], metrics["blend_weight"]
    z = lead_z(valid["weights"])
    outside = [w for w, lead, se in zip(valid["weights"], valid["leads"], valid["standard_errors"], strict=True)
               if w != 0 and lead > z * se]
    assert (weight in outside) if outside else weight == 0.0
    assert fused["blend_weight"] == weight

    # the run can be served: --method picks whose adapter (fedrec recommend loads it as serve does)
    serve = ["recommend", str(out), "--cache-dir", str(tmp_path / "cache"), "--offline", "--history", "i3",
             "--k", "4", "--json"]
    capsys.readouterr()
    no_method = main(serve)
    assert no_method == 2 and "central-dp-lora" in capsys.readouterr().err
    assert main([*serve, "--method", "central-dp-lora"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 4 and "i3" not in {i["item_id"] for i in items}


def test_cli_errors_are_one_clean_line(tmp_path: Path, capsys) -> None:
    code = main(["train-central", "--set", "train.lr=-1", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.lr" in err[0]

    code = main(["train-central", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c"), "--offline"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope" in err[0]


def test_a_central_partys_ledger_is_chained_signed_and_passes_the_audit(tmp_path: Path, tiny_data: Path,
                                                                         tiny_model_dir: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train-central", "--data", str(tiny_data), "--model", str(tiny_model_dir), "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--offline", "--set", "data.max_users=0",
            "--set", "train.batch_size=8", "--set", "train.dp_epochs=2", "--set", "prior.head_size=10",
            "--set", 'train.methods=["dp-cooccurrence", "central-dp-lora"]']
    assert main(args) == 0
    ledgers = out / "ledgers"

    for method in ("dp-cooccurrence", "central-dp-lora"):
        ledger = read_jsonl(ledgers / f"{method}.jsonl")
        assert chain.verify(ledger).status == "intact"
        key = chain.load_public(ledgers / f"{method}.pub")  # made on first use, beside the ledger
        assert chain.verify_signatures(ledger, trusted=key).status == "verified"
        assert [e["round"] for e in ledger] == list(range(1, len(ledger) + 1))
        assert all(e["users"] == 24 and e["budget"] == 8.0 for e in ledger)
        report = tmp_path / f"{method}.json"
        capsys.readouterr()
        assert main(["audit", str(ledgers / f"{method}.jsonl"), "--trust", f"{method}={ledgers / f'{method}.pub'}",
                     "--output", str(report)]) == 0
        [audited] = json.loads(report.read_text())["targets"][0]["clients"]
        status = {c["name"]: c["status"] for c in audited["checks"]}
        assert {k: v for k, v in status.items() if v != "pass"} == {"randomness": "info",
                                                                  "Poisson sampling rate": "info"}
    assert [e["mechanism"] for e in read_jsonl(ledgers / "central-dp-lora.jsonl")] == [
        "prior-counts", "prior-cooccurrence", "dp-sgd", "dp-sgd"]
