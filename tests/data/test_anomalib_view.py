"""anomalib's own Folder dataset reads the MVTec-style view of a synthetic set: same images, masks and labels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from anomgen.data import Digits
from anomgen.data.synthetic import SyntheticSet, export_mvtec_view, write_set


def test_anomalib_folder_reads_the_view(tmp_path):
    from anomalib.data.datasets import FolderDataset

    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        mask = torch.zeros(16, 16)
        mask[2 + i : 6 + i, 3:9] = 1
        samples.append(dict(id=f"{i:06d}", image=torch.rand(3, 16, 16, generator=gen), mask=mask, label=1,
                            generator="g", category="3", defect_type="a" if i % 2 else "b", sources=[], params={}))
    set_dir = write_set(tmp_path / "set", samples, {"generator": "g"})
    normals = Digits(category="3")
    view = export_mvtec_view(set_dir, tmp_path / "view", normals=[normals[j] for j in range(4)]) / "3"

    ours = {row["id"]: rec for row, rec in zip(SyntheticSet(set_dir).rows, SyntheticSet(set_dir))}
    test = FolderDataset(name="view", normal_dir=view / "train" / "good",
                         abnormal_dir=[view / "test" / "a", view / "test" / "b"],
                         mask_dir=[view / "ground_truth" / "a", view / "ground_truth" / "b"], split="test")
    assert len(test) == 6
    for k in range(len(test)):
        item = test[k]
        sample_id = item.image_path.rsplit("/", 1)[-1].removesuffix(".png")
        assert int(item.gt_label) == 1
        assert torch.equal((item.gt_mask > 0).float(), ours[sample_id]["mask"])
        png = np.asarray(Image.open(item.image_path).convert("RGB"), dtype=np.float32) / 255
        assert torch.allclose(torch.from_numpy(png).permute(2, 0, 1), ours[sample_id]["image"])
    train = FolderDataset(name="view", normal_dir=view / "train" / "good", split="train")
    assert len(train) == 4 and all(int(train[k].gt_label) == 0 for k in range(4))
