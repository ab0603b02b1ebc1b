"""The client's half of SecAgg+: fedrec's records in and out of Flower's legacy FitIns/FitRes."""

from __future__ import annotations

import torch
from fedrec.client.secagg import to_fitres_content, to_train_content
from fedrec.common.wire import SECAGG_KEYS, SECAGG_WEIGHT
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat


def fitins_content(tensors: dict[str, torch.Tensor]) -> RecordDict:
    keys = sorted(tensors)
    params = ndarrays_to_parameters([tensors[k].numpy() for k in keys])
    config = {"run-id": "r1", "server-round": 2, "lr": 0.01, SECAGG_KEYS: "\n".join(keys), SECAGG_WEIGHT: "num-examples"}
    return compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)  # type: ignore[arg-type]


def test_train_content_round_trip_and_refusal_weighs_zero() -> None:
    sent = {"b.lora_B": torch.randn(4, 2), "a.lora_A": torch.randn(2, 4)}

    train, keys, weight_key = to_train_content(fitins_content(sent))

    assert keys == ["a.lora_A", "b.lora_B"] and weight_key == "num-examples"
    got = train["arrays"].to_torch_state_dict()
    assert all(torch.equal(got[k], sent[k]) for k in sent)
    assert dict(train["config"]) == {"run-id": "r1", "server-round": 2, "lr": 0.01}

    trained = {k: v + 1 for k, v in sent.items()}
    ok = RecordDict({"arrays": ArrayRecord(torch_state_dict=trained),
                     "metrics": MetricRecord({"num-examples": 12.0, "epsilon": 1.5}),
                     "status": ConfigRecord({"status": "ok", "reason": "", "client": "a"})})
    fitres = compat.recorddict_to_fitres(to_fitres_content(ok, keys, weight_key, sent), keep_input=True)
    assert fitres.num_examples == 12 and fitres.metrics["client"] == "a" and fitres.metrics["epsilon"] == 1.5
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert all(torch.equal(torch.from_numpy(a), trained[k]) for k, a in zip(keys, arrays))

    refused = RecordDict({"metrics": MetricRecord({"epsilon": 7.9}),
                          "status": ConfigRecord({"status": "over-budget", "reason": "ε", "client": "b"})})
    fitres = compat.recorddict_to_fitres(to_fitres_content(refused, keys, weight_key, sent), keep_input=True)
    assert fitres.num_examples == 0 and fitres.metrics["status"] == "over-budget"
    assert all(not a.any() for a in parameters_to_ndarrays(fitres.parameters))
