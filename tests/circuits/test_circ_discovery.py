import json

import pytest
import torch

from madlens.circuits import discovery
from madlens.circuits.discovery import CLASSES, ResultCache, discover_ioi


@pytest.fixture(scope="module")
def planted_circuit(planted, planted_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("circuits-cache")
    result = discover_ioi(planted, data=planted_data, max_heads=2, cache_dir=cache, progress=False)
    return result, cache


def test_discovery_finds_the_planted_copying_head(planted_circuit):
    result, _ = planted_circuit
    assert result.heads["name_mover"] == [(0, 0)]
    assert result.heads["negative_name_mover"] == [(0, 1)]
    assert all(not result.heads[name] for name in CLASSES[2:])  # one layer: nothing upstream
    assert result.solves_task and result.clean_logit_diff > 3
    # Heads 2 and 3 write nothing, so the two planted heads are the whole behaviour.
    assert result.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert result.completeness > 0.9
    assert result.meets_target(max_fraction=0.5) and not result.meets_target()  # 2 of 4 heads
    direct = result.maps["direct effect"]
    assert direct[0, 0] < 0.8 and direct[0, 1] > 1.1
    assert torch.equal(direct[0, 2:], torch.ones(2))


def test_the_circuit_is_capped_at_max_heads(planted, planted_data):
    result = discover_ioi(planted, data=planted_data, max_heads=1, cache=False, progress=False)
    assert result.circuit == [(0, 0)] and result.heads["negative_name_mover"] == []
    # Without the negative mover the circuit overshoots the model's logit difference.
    assert result.faithfulness > 1.05


def test_circuit_json_has_the_promised_fields(planted_circuit):
    result, _ = planted_circuit
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["heads"]["name_mover"] == [[0, 0]]
    assert set(doc["heads"]) == set(CLASSES)
    for key in ("clean_logit_diff", "corrupted_logit_diff", "faithfulness", "completeness",
                "n_heads", "fraction_of_heads", "meets_target", "paper_comparison"):  # fmt: skip
        assert key in doc
    assert doc["n_heads"] == 2 and doc["fraction_of_heads"] == 0.5
    mover = next(row for row in doc["paper_comparison"] if row["class"] == "name_mover")
    assert mover["mean_attention"] > 0.99 and mover["paper_gpt2_heads"][0] == [9, 9]


def test_a_rerun_reads_every_experiment_from_the_cache(
    planted, planted_data, planted_circuit, monkeypatch
):
    result, cache = planted_circuit

    def no_session(*args, **kwargs):
        raise AssertionError("a cached rerun must not run the model")

    monkeypatch.setattr(discovery, "PatchingSession", no_session)
    again = discover_ioi(planted, data=planted_data, max_heads=2, cache_dir=cache, progress=False)
    assert again.heads == result.heads and again.faithfulness == result.faithfulness
    torch.testing.assert_close(again.maps["direct effect"], result.maps["direct effect"])


def test_cache_keys_depend_on_everything(tmp_path):
    store = ResultCache(tmp_path, ["weights-a", "float32", "data-1"])
    other = ResultCache(tmp_path, ["weights-b", "float32", "data-1"])
    assert store.key("scan", [[[1, 2]], "q"]) != store.key("scan", [[[1, 2]], "k"])
    assert store.key("scan", []) != other.key("scan", [])
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.arange(3.0)}  # noqa: E731
    first = store.get("scan", [], compute)
    second = store.get("scan", [], compute)
    assert calls == [1] and torch.equal(first["x"], second["x"])
