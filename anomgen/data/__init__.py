"""Datasets: parsers of the official on-disk layouts, the sets that ship with packages, the record, the tasks.

Every dataset yields the record of :mod:`anomgen.data.record`. Heavy libraries (scipy, scikit-learn) are imported
only by the parsers that need them, when they are constructed; torchvision is not needed at all.
"""

from anomgen.data.animal_mnist import AnimalMNIST
from anomgen.data.base import ArrayRecordDataset, RecordDataset, read_image, read_mask
from anomgen.data.cifar import CIFAR10, CIFAR100
from anomgen.data.cub import CUB
from anomgen.data.digits import Digits
from anomgen.data.flowers import Flowers102
from anomgen.data.folder import Folder
from anomgen.data.layouts import tiny_layout
from anomgen.data.mvtec import MVTecAD, MVTecLayout
from anomgen.data.record import RECORD_KEYS, Entry, make_record
from anomgen.data.textures import write_texture_task
from anomgen.data.visa import VisA

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CUB",
    "RECORD_KEYS",
    "AnimalMNIST",
    "ArrayRecordDataset",
    "Digits",
    "Entry",
    "Flowers102",
    "Folder",
    "MVTecAD",
    "MVTecLayout",
    "RecordDataset",
    "VisA",
    "make_record",
    "read_image",
    "read_mask",
    "tiny_layout",
    "write_texture_task",
]
