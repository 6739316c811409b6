"""Your own data in the MVTec-style layout (the parsing is :class:`~anomgen.data.mvtec.MVTecLayout`'s)."""

from __future__ import annotations

from pathlib import Path

from anomgen.data.mvtec import MVTecLayout

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

FOLDER_LAYOUT = """\
<root>/
  <category>/                      any name (a folder that holds train/ or test/)
    train/good/<name>.<ext> ...    normal training images (ext: png jpg jpeg bmp tif tiff)
    test/good/<name>.<ext> ...     normal test images
    test/<defect>/<name>.<ext> ... anomalous test images, one folder per defect type
    ground_truth/<defect>/<name>_mask.png ...
                                   one mask per anomalous test image, paired by file stem (<stem>_mask.<ext>,
                                   or <stem>.<ext>); required unless masks_required=False"""


class Folder(MVTecLayout):
    """A user's own anomaly-detection data laid out as MVTec AD, with any category names.

    Expected layout::

        <root>/
          widget/
            train/good/a.jpg ...
            test/good/b.jpg ...
            test/scratch/c.jpg ...
            ground_truth/scratch/c_mask.png ...

    The categories are the sub-folders of ``root`` that hold ``train/`` or ``test/``. Splits: ``train``, ``test``.
    Image extensions: png, jpg, jpeg, bmp, tif, tiff (any case). An anomalous image with no mask is an error
    unless ``masks_required=False``, in which case its mask is all zeros and its ``mask_path`` is ``""``.
    """

    name = "folder"
    layout = FOLDER_LAYOUT
    extensions = IMAGE_EXTENSIONS

    def find_categories(self, root: Path) -> list[str]:
        return sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and ((p / "train").is_dir() or (p / "test").is_dir())
        )
