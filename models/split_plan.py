"""The one planning step of the synthetic-validation generators (``model=diffstyle``, ``noise_set``, ``dataset_set``).

Their requests are the DiffStyle split of the support set, a :class:`~anomgen.generators.diffstyle.DiffStylePlan`
(style × content pairs and held-out normals, from ``n_style``, ``n_content``, ``n_held_out`` and ``split_seed``), so
that the sets of one task hold the same held-out normals and differ only in their anomalies. The plan is a pure
function of the support set: the datamodule asks ``model.predict_requests(support)`` for the requests, and the model
builds its own copy in ``setup("predict")``.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch.utils.data import Dataset

from anomgen.generators.diffstyle import N_CONTENT, N_STYLE, DiffStylePlan


class SplitPlanned(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, n_style: int = N_STYLE, n_content: int = N_CONTENT, n_held_out: int | None = None,
                 split_seed: int = 0) -> None:
        super().__init__()
        self.n_style, self.n_content, self.n_held_out, self.split_seed = n_style, n_content, n_held_out, split_seed
        self.plan: DiffStylePlan | None = None
        self._task_size: tuple[int, int] | None = None

    def predict_requests(self, support: Dataset) -> DiffStylePlan:
        """The requests over ``support``: a new plan. Pure: the model keeps nothing."""
        return DiffStylePlan(support, self.n_style, self.n_content, self.n_held_out, seed=self.split_seed)

    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        support = getattr(getattr(self.trainer, "datamodule", None), "support", None)
        if support is None:
            raise RuntimeError(f"{type(self).__name__} predicts from a datamodule's support set: run Trainer.predict "
                               "with a datamodule that has a `support` dataset (datamodules.anomaly.AnomalyDataModule)")
        self.plan = self.predict_requests(support)
        self._task_size = self.plan.image_size()
        self.plan_ready()

    def plan_ready(self) -> None:
        """Called once the plan is built (what a subclass derives from it)."""

    @property
    def set_info(self) -> dict:
        """What the export adds to ``set.json``: the split (the same for every set of the task)."""
        return {} if self.plan is None else {"split": self.plan.split}
