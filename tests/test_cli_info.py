"""`fslt info` on a ticket saved with timm's weights: the extra file is verified and listed."""
from __future__ import annotations

import timm
import torch

import timm_fslt
from timm_fslt.apps import cli


def _ticket(tmp_path):
    torch.manual_seed(0)
    model = timm_fslt.freeze(timm.create_model("resnet10t", num_classes=3), prune=0.35, lock=0.35)
    return timm_fslt.save_ticket(model, tmp_path / "ticket", timm_weights=True)


def test_info_verifies_and_lists_timm_weights(tmp_path, capsys, one_thread):
    ticket = _ticket(tmp_path)
    assert cli.main(["info", str(ticket)]) == 0
    out = capsys.readouterr().out
    size = (ticket / "model.safetensors").stat().st_size
    assert f"model.safetensors: {size:,} bytes, sha256 verified" in out

    data = bytearray((ticket / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped bit in the weights timm would load
    (ticket / "model.safetensors").write_bytes(bytes(data))
    assert cli.main(["info", str(ticket)]) == 1
    captured = capsys.readouterr()
    assert "model.safetensors" in captured.err and "sha256" in captured.err
    assert "ticket:" not in captured.out  # refused before anything is printed
