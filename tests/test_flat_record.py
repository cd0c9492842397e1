"""`flat_record`, what every example script writes into all_results.json and `hf-flat compare` reads:
it must know every method of the registry, with the arguments that apply to it."""

import pytest

from hf_flat import FlatTrainingArguments
from hf_flat.args import AVERAGING_METHODS, PERTURBATION_METHODS
from hf_flat.scripts import flat_record

METHODS = [*PERTURBATION_METHODS, *AVERAGING_METHODS, "wasam", "sam+lawa", "gsam+ema", "looksam+swa"]


@pytest.mark.parametrize("method", METHODS)
def test_flat_record_knows_every_method(tmp_path, method):
    args = FlatTrainingArguments(str(tmp_path), flat_method=method, report_to="none", lawa_k=4,
                                 swa_lr=0.01 if any(a in method for a in ("swa", "ema", "lawa", "wasam")) else None)
    record = flat_record(args, ["a warning"])
    settings = record["flat_settings"]
    assert record["flat_method"] == method and record["flat_warnings"] == ["a warning"]
    assert settings and all(getattr(args, name) == value for name, value in settings.items())
    perturbation, averaging = args.flat_perturbation, args.flat_averaging
    if perturbation in ("sam", "asam", "avg_sam", "gsam", "looksam", "esam"):
        assert "sam_rho" in settings
    if averaging:
        assert settings["average_start"] == args.average_start and settings["swa_lr"] == 0.01
    if averaging == "lawa":
        assert settings["lawa_k"] == 4
