"""The flat state file and its shard files (hf_flat.state_file), read in other layouts than the
one that wrote them. (tests/test_fsdp.py writes them for real under FSDP.)"""

import os

import pytest
import torch

from hf_flat.sharding import Rows
from hf_flat.state_file import load_flat_state, save_flat_state
from helpers import write_sharded

STATE = "hf_flat_state.safetensors"


def test_sharded_state_reads_whole_or_in_any_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    whole = {"averaging.w": torch.randn(7, 3, generator=g), "averaging.b": torch.randn(2, generator=g)}
    path = write_sharded(str(tmp_path / STATE), whole, processes=3, unsharded={"saf.logits": torch.ones(2, 2)})
    assert sorted(os.listdir(tmp_path)) == [
        "hf_flat_state-shard-00000-of-00003.safetensors", "hf_flat_state-shard-00001-of-00003.safetensors",
        "hf_flat_state-shard-00002-of-00003.safetensors", "hf_flat_state.safetensors",
    ]
    state, meta = load_flat_state(path)
    assert meta["hf_flat_state_version"] == "2" and meta["averaging"] == "swa"
    assert set(state) == {"averaging.w", "averaging.b", "saf.logits"}
    assert state.shape("averaging.w") == (7, 3)
    for key, t in whole.items():  # whole (a run without FSDP, `--weights averaged`)
        assert torch.equal(state[key], t)
    # rows 2-6 of w span the files of processes 0 (rows 0-2), 1 (3-5) and 2 (6): a 2-process layout's second half
    assert torch.equal(state.rows("averaging.w", Rows(2, 7, (7, 3))), whole["averaging.w"][2:7])
    assert torch.equal(state.rows("averaging.b", Rows(1, 2, (2,))), whole["averaging.b"][1:2])
    assert state.rows("averaging.b", Rows(2, 2, (2,))).shape == (0,)  # a process holding no row
    assert torch.equal(state.rows("saf.logits", Rows(1, 2, (2, 2))), torch.ones(1, 2))  # unsharded tensors too


def test_a_missing_shard_file_is_a_clear_error(tmp_path):
    path = write_sharded(str(tmp_path / STATE), {"averaging.w": torch.zeros(4, 2)}, processes=2)
    os.remove(tmp_path / "hf_flat_state-shard-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"lists the shard file hf_flat_state-shard-00001-of-00002.safetensors, "
                                         r"which cannot be read .* the checkpoint is incomplete"):
        load_flat_state(path)


def test_unsharded_files_keep_version_1(tmp_path):
    path = str(tmp_path / "hf_flat_state.safetensors")
    save_flat_state(path, [({"averaging.w": torch.ones(2)}, {"averaging": "swa"})], "swa")
    state, meta = load_flat_state(path)
    assert meta["hf_flat_state_version"] == "1" and torch.equal(state["averaging.w"], torch.ones(2))
