"""``model=defect_classifier``: AnomalyDiffusion's defect-type classifier, how useful generated anomalies are as data.

A torchvision ResNet (ResNet-34 in the paper) with a new head over the defect types is trained on a synthetic set's
generated anomalies (label: the manifest's ``defect_type``) with Adam (lr 1e-4; the paper trains 30 epochs:
``trainer.max_epochs``) and cross-entropy, then tested on the category's real held-out anomalies (the test split's
anomalies less the generator's training third): ``test/defect_type_accuracy`` (and per type,
``test/defect_type_accuracy/<type>``). Use it with ``datamodule=defect_types`` (:class:`DefectTypeDataModule`).

**Checkpoint selection.** The reference keeps the epoch of best *test* accuracy (the paper's 66.1% over 14 objects is
that). Never here: after every validation epoch the weights with the best accuracy on *held-out generated* anomalies
(``select_on="accuracy"``, ties to the lower validation loss; or ``"loss"``) are kept, and loaded when fitting ends;
the test runs on them. With no validation set (``datamodule.validation=none``) the last weights are tested. The
selected weights and what they were selected on are written to ``<run>/defect_classifier.pt`` (the run's ``classifier``
output) and travel in Lightning checkpoints, so a resumed run keeps its selection.

ImageNet weights (``pretrained``: a torchvision weights name of ``arch`` or a file, found by
:func:`anomgen.pretrained.torchvision_weights`; ``null``: random init) load when fitting starts (``setup("fit")``),
not at construction, so that the config instantiates offline. The paper notes the ImageNet init matters. Images are
resized to ``image_size`` and ImageNet-normalised inside the model; ``augment`` (:func:`anomgen.pixels.augment_batch`)
applies at train time only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import Metric

from anomgen.errors import ConfigError
from anomgen.files import to_json
from anomgen.pixels import augment_batch, imagenet_normalize, resize
from anomgen.pretrained import load_state_dict_strict, load_weights_file, torchvision_weights

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SELECT_ON = ("accuracy", "loss")
SELECTED_ON = "held-out generated anomalies (never the test split)"


class DefectCounts(Metric):
    """Per-class correct and total predictions and the summed loss, summed across DDP processes."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor, loss_sum: Tensor) -> None:
        hit = (logits.argmax(dim=1) == labels).long()
        self.correct += torch.bincount(labels, weights=hit, minlength=len(self.correct)).long()
        self.total += torch.bincount(labels, minlength=len(self.total))
        self.loss_sum += loss_sum.detach().double()

    def compute(self) -> dict[str, Tensor]:
        n = self.total.sum().clamp(min=1)
        return {"accuracy": self.correct.sum().double() / n, "loss": self.loss_sum / n,
                "per_class": self.correct.double() / self.total.clamp(min=1), "total": self.total}


class DefectTypeClassifier(LightningModule):
    trainable = True  # train.py runs Trainer.fit
    generates = False
    tests_after_fit = True  # then Trainer.test on the selected weights: the real held-out anomalies

    def __init__(
        self,
        arch: str = "resnet34",
        pretrained: str | None = "IMAGENET1K_V1",
        image_size: int = 224,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        select_on: str = "accuracy",
        augment: dict | None = None,
        classifier_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from torchvision.models import get_model

        if arch not in RESNET_ARCHS:
            raise ConfigError(f"model.arch must be a torchvision ResNet, one of {RESNET_ARCHS}, got {arch!r}")
        if select_on not in SELECT_ON:
            raise ConfigError(f"model.select_on must be one of {SELECT_ON}, got {select_on!r}")
        self.save_hyperparameters()
        self.pretrained = None if pretrained is None else str(pretrained)
        with torch.random.fork_rng(devices=[]):  # the same initial weights for the same seed; the global state kept
            torch.manual_seed(seed)
            self.net = get_model(arch, weights=None)  # architecture only: the ImageNet weights come in setup("fit")
        self.num_features = self.net.fc.in_features
        self.net.fc = nn.Identity()  # the head over the defect types is made in setup, once they are known
        self.head: nn.Linear | None = None
        self.defect_types: list[str] | None = None
        self.augment = None if augment is None else dict(augment)
        self._weights_loaded = self.pretrained is None
        self.selected: dict | None = None
        self._selected_state: dict[str, Tensor] | None = None
        self.stage_outputs: dict = {}

    # -- classes, head and weights -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "defect_types"):
            raise ConfigError("model=defect_classifier needs datamodule=defect_types (a DefectTypeDataModule: the "
                              "generated anomalies and their defect types)")
        datamodule.setup(stage)
        if datamodule.defect_types is None:
            datamodule.train_dataloader()  # raises: says which setting is missing
        if stage == "fit" and not self._weights_loaded:
            self._load_imagenet()
        if self.head is None:
            self.defect_types = list(datamodule.defect_types)
            generator = torch.Generator().manual_seed(int(self.hparams.seed))
            head = nn.Linear(self.num_features, len(self.defect_types))
            with torch.no_grad():  # seeded: the same head on every rank and run, whatever ran before
                bound = 1.0 / self.num_features ** 0.5
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
            self.head = head.to(self.device)
        elif list(datamodule.defect_types) != self.defect_types:
            raise ConfigError(f"the classifier was made for defect types {self.defect_types}, the datamodule has "
                              f"{datamodule.defect_types}")
        self.val_counts = DefectCounts(len(self.defect_types)).to(self.device)
        self.test_counts = DefectCounts(len(self.defect_types)).to(self.device)

    def _load_imagenet(self) -> None:
        file = torchvision_weights(self.hparams.arch, self.pretrained)  # offline and missing: says how to supply it
        state = {k: v for k, v in load_weights_file(file).items() if not k.startswith("fc.")}
        load_state_dict_strict(self.net, state, str(file))
        self._weights_loaded = True

    # -- training ------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Logits over ``defect_types`` (B × C) for [0, 1] images B × 3 × H × W."""
        size = int(self.hparams.image_size)
        return self.head(self.net(imagenet_normalize(resize(images, (size, size)))))

    def _loss(self, batch: dict, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        images = batch["image"]
        if train and self.augment is not None:
            images = augment_batch(images, int(self.hparams.image_size), **self.augment)
        logits = self(images)
        labels = batch["defect_label"].long()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the defect-type loss is {loss.item()} at step {self.global_step}; lower lr")
        return logits, labels, loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits, labels, loss_sum = self._loss(batch, train=True)
        n = len(labels)
        loss = loss_sum / n
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/defect_type_accuracy", (logits.argmax(1) == labels).float().mean(), on_step=False,
                 on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = list(self.net.parameters()) + list(self.head.parameters())
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # -- selection on held-out generated anomalies --------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels, loss_sum = self._loss(batch, train=False)
        self.val_counts.update(logits, labels, loss_sum)

    def on_validation_epoch_end(self) -> None:
        out = self.val_counts.compute()  # synced across processes: every rank selects the same epoch
        self.val_counts.reset()
        if int(out["total"].sum()) == 0:
            return
        accuracy, loss = float(out["accuracy"]), float(out["loss"])
        self.log("val/defect_type_accuracy", accuracy, prog_bar=True, sync_dist=False)
        self.log("val/loss", loss, sync_dist=False)
        if self.trainer.sanity_checking:
            return
        score = (accuracy, -loss) if self.hparams.select_on == "accuracy" else (-loss,)
        best = self.selected["score"] if self.selected else None
        if best is None or tuple(score) > tuple(best):
            self.selected = {"epoch": int(self.current_epoch), "val_defect_type_accuracy": accuracy,
                             "val_loss": loss, "score": list(score), "select_on": self.hparams.select_on}
            self._selected_state = {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()}

    def on_fit_end(self) -> None:
        if self._selected_state is not None:
            self.load_state_dict(self._selected_state)
        if self.trainer.is_global_zero:
            self._save_classifier()
        self.trainer.strategy.barrier("defect_classifier_saved")

    def _save_classifier(self) -> None:
        path = Path(self.hparams.classifier_path or Path(self.trainer.default_root_dir) / "defect_classifier.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        datamodule = self.trainer.datamodule
        info = {
            "arch": self.hparams.arch, "image_size": int(self.hparams.image_size), "pretrained": self.pretrained,
            "defect_types": self.defect_types, "pairs_set": getattr(datamodule, "pairs_set", None),
            "selected": self.selected, "selected_on": SELECTED_ON if self.selected else "nothing: the last weights",
            "epochs": int(self.current_epoch),
        }
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"state_dict": state, "info": to_json(info)}, path)
        self.stage_outputs = {"classifier": str(path.resolve())}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["defect_classifier"] = {"defect_types": self.defect_types, "selected": self.selected,
                                           "selected_state": self._selected_state}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("defect_classifier") or {}
        if saved.get("defect_types") is not None and self.defect_types is not None \
                and list(saved["defect_types"]) != self.defect_types:
            raise ConfigError(f"checkpoint made for defect types {saved['defect_types']}, the datamodule has "
                              f"{self.defect_types}")
        self.selected, self._selected_state = saved.get("selected"), saved.get("selected_state")
        self._weights_loaded = True  # the checkpoint's weights replace the ImageNet ones

    # -- the real held-out anomalies ----------------------------------------------------------------------------
    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels, loss_sum = self._loss(batch, train=False)
        self.test_counts.update(logits, labels, loss_sum)

    def on_test_epoch_end(self) -> None:
        out = self.test_counts.compute()
        self.test_counts.reset()
        self.log("test/defect_type_accuracy", float(out["accuracy"]), sync_dist=False)
        self.log("test/loss", float(out["loss"]), sync_dist=False)
        self.log("test/num_anomalies", float(out["total"].sum()), sync_dist=False)
        for name, value, total in zip(self.defect_types, out["per_class"].tolist(), out["total"].tolist()):
            if total:
                self.log(f"test/defect_type_accuracy/{name}", value, sync_dist=False)
