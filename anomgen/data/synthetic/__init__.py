"""The synthetic set: the on-disk interface between generation and everything else.

A synthetic set is a folder::

    <set>/
      manifest.jsonl   one JSON object per line, sorted by id:
                       {"id": "000042", "image": "images/000042.png", "mask": "masks/000042.png" or null,
                        "label": 1, "generator": "noise_patch", "category": "3", "defect_type": "noise_patch",
                        "sources": ["sklearn-digits:00012"], "params": {...}, "scores": {}}
      set.json         {"format_version": 1, "generator": ..., "config": {...}, "checkpoint": ..., "code_version": ...,
                        "task": {...}, "counts": {"total": N, "anomalous": A, "normal": M,
                        "by_defect_type": {...}, "by_category": {...}}, "created_at": ISO time}
      images/          RGB 8-bit PNG, one per sample
      masks/           L-mode PNG with values 0 / 255, one per sample that has a mask

The package is split by job: :mod:`~anomgen.data.synthetic.format` (ids, manifest rows, counts, reading and
validating ``manifest.jsonl`` / ``set.json``), :mod:`~anomgen.data.synthetic.writer` (writing, merging, scores,
subsets), :mod:`~anomgen.data.synthetic.reader` (the dataset, checks) and :mod:`~anomgen.data.synthetic.views`
(the MVTec-style view). The names below are its public API.

Writing is atomic. Samples go into a *shard* (a folder that is not a set: it never holds ``set.json``) through
:class:`SetWriter` (one :class:`~anomgen.data.generation.GeneratedBatch` at a time with
:meth:`SetWriter.add_batch`); under DDP every rank writes its own shard (see :func:`shard_path`) and rank 0 calls
:func:`merge_shards` after a barrier. The merge builds the set under a hidden temporary sibling name
(``.<name>.tmp-<pid>-<random>``, :func:`anomgen.files.atomic_dir`) and renames it into place only when it is
complete, so that an interrupted run never leaves a folder that looks like a finished set. :func:`write_set` does
the same in one process.

Readers: :class:`SyntheticSet` yields the project's record, so that synthetic and real data flow through the same
code; :func:`export_mvtec_view` lays a set out as an MVTec-style folder (``test/<defect>/``,
``ground_truth/<defect>/<id>_mask.png``, ``train/good/``) for parsers and tools that read that layout.
"""

from anomgen.data.synthetic.format import (
    FORMAT_VERSION,
    MANIFEST,
    ROW_KEYS,
    SET_INFO,
    compute_counts,
    format_id,
    is_work_name,
    load_set,
    read_manifest,
    read_set_info,
    shard_path,
    sort_key,
    to_json_value,
)
from anomgen.data.synthetic.reader import SyntheticSet, check_set, is_complete_set
from anomgen.data.synthetic.views import export_mvtec_view
from anomgen.data.synthetic.writer import (
    SetWriter,
    check_target,
    merge_shards,
    remove_leftovers,
    subset_set,
    update_scores,
    write_set,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ROW_KEYS",
    "SET_INFO",
    "SetWriter",
    "SyntheticSet",
    "check_set",
    "check_target",
    "compute_counts",
    "export_mvtec_view",
    "format_id",
    "is_complete_set",
    "is_work_name",
    "load_set",
    "merge_shards",
    "read_manifest",
    "read_set_info",
    "remove_leftovers",
    "shard_path",
    "sort_key",
    "subset_set",
    "to_json_value",
    "update_scores",
    "write_set",
]
