"""One mixture rule (dlp_lora/mixture.py) at every entry point: the Mixture type, use_mixture, the CLI's
--mixture (generate and export-mixture), export_mixture and the server's request parser.

Every entry point runs the same table: what it accepts (negative weights included; zero weights
dropped) and what it refuses, with the same words.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft_fixtures import make_adapter, tiny_model

from dlp_lora import LoRABank, patch_model, use_mixture
from dlp_lora.cli import main as cli_main
from dlp_lora.export import MIXTURE_NAME, ExportError, export_mixture
from dlp_lora.mixture import MAX_MIXTURE_WEIGHT, Mixture, MixtureError

NAMES = ("alpha", "beta")
WEIGHT_RULE = "must be a finite number with |weight| <= 100 (negative weights are allowed)"

# (mixture, what it becomes {name: weight} or None when refused, the words of the refusal)
ACCEPTED = [
    ({"alpha": 0.7, "beta": -0.3}, {"alpha": 0.7, "beta": -0.3}, None),  # task negation
    ({"beta": 1.0, "alpha": 0}, {"beta": 1.0}, None),  # zero weights are dropped
    ({"alpha": MAX_MIXTURE_WEIGHT, "beta": -MAX_MIXTURE_WEIGHT}, {"alpha": 100.0, "beta": -100.0}, None),
    ({"alpha": 2}, {"alpha": 2.0}, None),
]
REFUSED = [
    ({}, None, "is empty"),
    ({"zeta": 1.0}, None, "names unknown adapter(s) ['zeta']; the adapters are ['alpha', 'beta']"),
    ({"alpha": math.nan}, None, f"weight of 'alpha' {WEIGHT_RULE}, got nan"),
    ({"alpha": math.inf}, None, f"weight of 'alpha' {WEIGHT_RULE}, got inf"),
    ({"alpha": 1e38}, None, f"weight of 'alpha' {WEIGHT_RULE}, got 1e+38"),
    ({"alpha": 1e300}, None, f"weight of 'alpha' {WEIGHT_RULE}, got 1e+300"),
    ({"alpha": 1.0, "beta": -100.5}, None, f"weight of 'beta' {WEIGHT_RULE}, got -100.5"),
    ({"alpha": 0.0, "beta": 0}, None, "has only zero weights"),
]
NOT_NUMBERS = [  # cannot be written on the command line
    ({"alpha": True}, None, f"weight of 'alpha' {WEIGHT_RULE}, got True"),
    ({"alpha": "1"}, None, f"weight of 'alpha' {WEIGHT_RULE}, got '1'"),
    ([("alpha", 1.0)], None, "must be a mapping {adapter name: weight}, got list"),
    ({"alpha": 10**400}, None, f"weight of 'alpha' {WEIGHT_RULE}, got 1000000"),  # overflows float
    ({"z" * 10**5: 1.0}, None, "names unknown adapter(s) ['zzzzz"),  # echoed cut short, not 100 kB
]
TABLE = ACCEPTED + REFUSED + NOT_NUMBERS
CLI_TABLE = ACCEPTED + REFUSED


def _id(case):
    return repr(case[0])[:40]


def _spec(mixture: dict) -> str:
    return ",".join(f"{name}={weight}" for name, weight in mixture.items())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama saved as a model directory, and two real PEFT adapters named NAMES."""
    root = tmp_path_factory.mktemp("mixture")
    base = tiny_model("llama", seed=3)
    base.save_pretrained(root / "model")
    dirs = {name: make_adapter(base, root / name, seed=30 + i) for i, name in enumerate(NAMES)}
    return base, root / "model", dirs


# --- the type ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixture, kept, words", TABLE, ids=[_id(c) for c in TABLE])
def test_mixture_type(mixture, kept, words):
    if kept is None:
        with pytest.raises(MixtureError) as info:
            Mixture(mixture, NAMES)
        assert str(info.value) == f"mixture {info.value.detail}" and words in info.value.detail
        assert len(info.value.detail) < 300
        assert isinstance(info.value, ValueError)
        return
    got = Mixture(mixture, NAMES)
    assert got == kept and list(got) == list(kept)  # a Mapping, in the order given, without zeros
    assert got.dropped == tuple(n for n, w in mixture.items() if w == 0)
    ids, weights = got.bank_ids(["beta", "gamma", "alpha"])
    assert dict(zip([("beta", "gamma", "alpha")[i] for i in ids], weights, strict=True)) == kept
    assert [n for n, _ in got.in_order(["beta", "alpha"])] == [n for n in ("beta", "alpha") if n in kept]


def test_bank_ids_refuses_a_name_the_bank_lacks():
    with pytest.raises(MixtureError, match=r"names unknown adapter\(s\) \['alpha'\]"):
        Mixture({"alpha": 1.0}, NAMES).bank_ids(["beta"])


# --- use_mixture --------------------------------------------------------------------------------

# use_mixture also takes {} for a row with no adapter (the base model): a row's choice, not a mixture
USE_MIXTURE_TABLE = [case for case in TABLE if case[0] != {}]


@pytest.mark.parametrize("mixture, kept, words", USE_MIXTURE_TABLE, ids=[_id(c) for c in USE_MIXTURE_TABLE])
def test_use_mixture(adapters, mixture, kept, words):
    base, _, dirs = adapters
    model = patch_model(tiny_model("llama", seed=3), LoRABank.from_peft(dirs))
    ids = torch.tensor([[1, 2, 3]])
    if kept is None:
        with pytest.raises(ValueError, match="use_mixture") as info:
            with use_mixture(model, [{"alpha": 1.0}, mixture]):
                pass
        message = str(info.value)
        if not isinstance(mixture, dict):  # not a row entry at all (a row may also be a Route or None)
            words = "must be a dict {adapter_name: weight}, a Route or None"
        assert message.startswith("use_mixture: mixtures[1] ") and words in message, message
        return
    with torch.no_grad(), use_mixture(model, mixture) as log:
        model(ids)
        (record,) = list(log)
    assert dict(zip(record.adapters, record.weights, strict=True)) == pytest.approx(kept)


# --- export_mixture and the CLI ------------------------------------------------------------------

@pytest.mark.parametrize("mixture, kept, words", TABLE, ids=[_id(c) for c in TABLE])
def test_export_mixture(adapters, tmp_path, mixture, kept, words):
    _, _, dirs = adapters
    bank = LoRABank.from_peft(dirs)
    if kept is None:
        with pytest.raises(ExportError) as info:
            export_mixture(bank, mixture, tmp_path / "out")
        assert info.value.arg == "mixture" and words in info.value.detail
        assert str(info.value) == f"export_mixture: `mixture` {info.value.detail}"
        assert list(tmp_path.iterdir()) == []
        return
    out = export_mixture(bank, mixture, tmp_path / "out")
    import json

    record = json.loads((out / MIXTURE_NAME).read_text())
    in_bank_order = {n: kept[n] for n in NAMES if n in kept}
    assert {a["name"]: a["weight"] for a in record["adapters"]} == in_bank_order
    assert list(in_bank_order) == [a["name"] for a in record["adapters"]]


@pytest.mark.parametrize("mixture, kept, words", CLI_TABLE, ids=[_id(c) for c in CLI_TABLE])
def test_cli_export_mixture(adapters, tmp_path, capsys, mixture, kept, words):
    _, _, dirs = adapters
    argv = ["export-mixture", "--adapters", *(f"{n}={d}" for n, d in dirs.items()), "--mixture",
            _spec(mixture), "--out", str(tmp_path / "out")]
    code = cli_main(argv)
    captured = capsys.readouterr()
    if kept is None:
        assert code == 2 and captured.err.count("\n") == 1, captured.err
        assert f"--mixture: {words}" in captured.err, captured.err
        assert list(tmp_path.iterdir()) == []
    else:
        assert code == 0, captured.err
        assert (tmp_path / "out" / MIXTURE_NAME).is_file()


@pytest.mark.parametrize("mixture, kept, words", REFUSED, ids=[_id(c) for c in REFUSED])
def test_cli_generate_refuses_before_loading(adapters, capsys, mixture, kept, words):
    _, model_dir, dirs = adapters
    argv = ["generate", "--model", str(model_dir), "--adapters", *(f"{n}={d}" for n, d in dirs.items()),
            "--mixture", _spec(mixture), "--prompt", "hello"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--mixture: {words}" in err, err


# --- the server's request parser ----------------------------------------------------------------

@pytest.mark.parametrize("mixture, kept, words", TABLE, ids=[_id(c) for c in TABLE])
def test_server_request(mixture, kept, words):
    from dlp_lora.serving.protocol import APIError, ServedModels, parse_completion_request

    served = ServedModels("tiny", NAMES, max_context=64)
    body = {"model": "tiny", "prompt": "x", "mixture": mixture}
    if kept is None:
        with pytest.raises(APIError) as info:
            parse_completion_request(body, served)
        assert (info.value.status, info.value.param) == (400, "mixture")
        assert info.value.message.startswith("mixture ") and words in info.value.message
        return
    request = parse_completion_request(body, served)
    assert request.mixture == kept and isinstance(request.mixture, Mixture)
