"""Sharded tables under keras.distribution on JAX, with 8 virtual CPU devices.

scripts/sharded.py trains the same model from the same weights on one device,
under DataParallel, and under ModelParallel with the table (and LoRA's A)
sharded by rows (an untied reverse table by vocabulary columns); the results
must agree within float32 rounding.
"""

import json

import pytest
from processes import SCRIPTS, needs, run_under

pytestmark = needs("jax")  # keras.distribution covers JAX only

CASES = (
    "float",
    "lora",
    "int8_lora",
    "reversible_untied",
    "reversible_lora",
    "bag_mean",
    "bag_max_lora",
)
TRAINED_TABLE = ("float", "reversible_untied", "bag_mean")
DISTRIBUTIONS = ("data_parallel", "model_parallel")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "report.json"
    run_under(
        "jax",
        SCRIPTS / "sharded.py",
        out,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    return json.loads(out.read_text())


def test_eight_devices(report):
    assert report["devices"] == 8


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("case", CASES)
def test_training_matches_a_single_device(report, case, distribution):
    result = report[case][distribution]
    assert result["weights_max_diff"] < TOLERANCE
    assert result["predictions_max_diff"] < TOLERANCE
    assert result["trained"] == report[case]["single"]["trained"]
    table_trains = "tokens/embeddings" in result["trained"]
    assert table_trains == (case in TRAINED_TABLE)  # LoRA freezes the table
    if case == "reversible_untied":
        assert "tokens/reverse_embeddings" in result["trained"]


@pytest.mark.parametrize("case", CASES)
def test_model_parallel_shards_the_table_and_lora_a_by_rows(report, case):
    layouts = report[case]["model_parallel"]["layouts"]
    assert layouts["tokens/embeddings"] == "P('model', None)"
    if case not in TRAINED_TABLE:
        assert layouts["tokens/lora_embeddings_a"] == "P('model', None)"
        assert layouts["tokens/lora_embeddings_b"] == "P(None, None)"
    if case == "reversible_untied":
        assert layouts["tokens/reverse_embeddings"] == "P(None, 'model')"


@pytest.mark.parametrize("distribution", ("single", *DISTRIBUTIONS))
@pytest.mark.parametrize("case", CASES)
def test_traced_invalid_id_gives_zeros_when_sharded(report, case, distribution):
    assert report[case][distribution]["invalid_row"] == 0.0
