"""SyntheticSetExport takes a GeneratedBatch only."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule

from callbacks.export import SyntheticSetExport


class DictGenerator(LightningModule):
    pass


def test_a_dict_from_predict_step_is_a_type_error_naming_the_model(tmp_path):
    export = SyntheticSetExport(str(tmp_path / "set"))
    outputs = {"index": torch.tensor([0]), "image": torch.rand(1, 3, 4, 4)}
    with pytest.raises(TypeError, match=r"DictGenerator\.predict_step must return an .*GeneratedBatch, got dict"):
        export.on_predict_batch_end(None, DictGenerator(), outputs, None, 0)
