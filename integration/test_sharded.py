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


def on_eight_devices(script, *args):
    """Runs `script` under JAX with 8 virtual CPU devices."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run_under("jax", script, *args, env=env)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "report.json"
    on_eight_devices(SCRIPTS / "sharded.py", out)
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


# --- Every variable a layer creates, sharded after its table alone. ---
#
# scripts/sharded_variables.py builds each case under a layout map whose only
# rule is `tokens/embeddings` (rows over "model", 4 devices; "batch" is 2):
# slots, scales, LoRA's adapters and an untied reverse table must follow.

ROWS = "('model',)"
REVERSE = "(None, 'model')"
REPLICATED = "()"
SLOTS = {
    "sgd": ("iteration",),
    "adagrad": ("accumulator", "iteration"),
    "adam": ("momentum", "velocity", "iteration"),
}


def expected_layouts(case):
    """Variable name -> sharding spec, for every variable of the case."""
    table = {"embeddings": ROWS}
    if "int8" in case or "int4_per_row" in case:
        table["embeddings_scale"] = ROWS
    elif "int4_grouped" in case:
        table.update(embeddings_scale=ROWS, embeddings_zero=ROWS, g_idx=REPLICATED)
    if case.startswith("untied"):
        table["reverse_embeddings"] = REVERSE
        if "int8" in case:
            table["reverse_embeddings_scale"] = ROWS  # one per vocabulary entry
        if "int4_grouped" in case:
            table.update(
                reverse_embeddings_scale=REVERSE, reverse_embeddings_zero=REVERSE
            )
    optimizer = next((o for o in SLOTS if case.endswith(o)), None)
    if "lora" in case:
        table.update(lora_embeddings_a=ROWS, lora_embeddings_b=REPLICATED)
        target = "lora_embeddings_a"  # the frozen table keeps no slots
    else:
        target = "embeddings"
    for slot in SLOTS.get(optimizer, ()):
        table[f"{target}_{slot}"] = REPLICATED if slot == "iteration" else ROWS
    return {f"tokens/{name}": spec for name, spec in table.items()}


VARIABLE_CASES = (
    "float_dense",
    "float_sgd",
    "float_adagrad",
    "float_adam",
    "lora_adam",
    "int8",
    "int8_lora_adam",
    "int4_per_row",
    "int4_grouped",
    "tied",
    "tied_int8",
    "untied",
    "untied_adam",
    "untied_int8",
    "untied_int4_grouped",
    "bag_adam",
)
ROW_SPARSE = [
    case
    for case in VARIABLE_CASES
    if case.endswith(("sgd", "adagrad", "adam")) and "lora" not in case
]


@pytest.fixture(scope="module")
def variables_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_variables")
    out = root / "report.json"
    on_eight_devices(SCRIPTS / "sharded_variables.py", out, root)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_every_variable_follows_the_table(variables_report, case):
    variables = variables_report[case]["variables"]
    layouts = {path: v["spec"] for path, v in variables.items()}
    assert layouts == expected_layouts(case)


@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_each_device_holds_its_share_of_every_variable(variables_report, case):
    for path, variable in variables_report[case]["variables"].items():
        ways = 4 if "model" in variable["spec"] else 1
        assert variable["per_device_bytes"] <= 1.05 * variable["bytes"] / ways, path


@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_the_table_is_initialized_sharded(variables_report, case):
    # The table's initializer ran inside a compiled program sharded by the
    # layout (once per table: twice for an untied head), never whole.
    traced = variables_report[case]["init_traced"]
    assert traced == [True] * (2 if case.startswith("untied") else 1)


@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_sharded_training_matches_one_device(variables_report, case):
    fit = variables_report[case]["fit"]
    assert fit["weights_max_diff"] < TOLERANCE
    assert fit["trained"] == fit["single_trained"]
    table_trains = "tokens/embeddings" in fit["trained"]
    # A quantized table is frozen, and LoRA freezes the table.
    assert table_trains == ("int" not in case and "lora" not in case)
    # Training keeps every layout.
    after = {path: v["spec"] for path, v in fit["variables_after"].items()}
    assert after == expected_layouts(case)


@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_the_compiled_step_moves_no_table_sized_data(variables_report, case):
    report = variables_report[case]
    shard = report_shard_elements(variables_report)
    moved = [c for c in report["collectives"] if c["elements"] >= shard]
    assert not moved, moved


def report_shard_elements(report):
    return report["vocab"] * report["dim"] // 4


@pytest.mark.parametrize("case", ROW_SPARSE)
def test_invalid_ids_train_nothing_when_sharded(variables_report, case):
    invalid = variables_report[case]["invalid"]
    assert invalid["max_diff"] < TOLERANCE
    assert invalid["valid_rows_moved"]
    assert not invalid["other_rows_moved"]


@pytest.mark.parametrize("target", ("same_mesh", "other_mesh", "single"))
@pytest.mark.parametrize("case", VARIABLE_CASES)
def test_sharded_checkpoint_loads_anywhere(variables_report, case, target):
    loaded = variables_report[case]["checkpoints"][target]
    assert loaded["weights_max_diff"] == 0.0
    expected = expected_layouts(case)
    if target == "single":
        expected = {path: REPLICATED for path in expected}
    assert loaded["specs"] == expected


# --- keras-hub models with their own layout maps, upgraded. ---


@pytest.fixture(scope="module")
def hub_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_hub") / "report.json"
    on_eight_devices(SCRIPTS / "sharded_keras_hub.py", out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ("gemma", "llama"))
def test_keras_hub_model_generates_the_same_tokens_sharded(hub_report, model):
    report = hub_report[model]
    assert report["class"].endswith(".ReversibleEmbedding")
    assert report["class"].startswith("keras_ext_embedding.")
    assert report["same_tokens"]
    assert report["generated"] > 0
    # keras-hub's map shards the table (rows over "model", columns over
    # "batch"); an untied head, which it leaves out, follows the table.
    expected = {"token_embedding/embeddings": "('model', 'batch')"}
    if model == "llama":
        assert report["stock_specs"]["token_embedding/reverse_embeddings"] == "()"
        expected["token_embedding/reverse_embeddings"] = "('batch', 'model')"
    assert report["specs"] == expected
