"""LightningDataModule for DetReIDX-format tracklets: P×K identity batches, validation split, case folders."""

from __future__ import annotations

import dataclasses
import os
import time
from functools import cached_property
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from farreid.data.dataset import TrackletDataset
from farreid.data.datasets import VideoReIDDataset, make_reader, reader_class
from farreid.data.geometry import QUANTITIES, FileNameGeometry, Geometry, GeometrySource
from farreid.data.index_cache import cache_path, cached_split, default_cache_dir
from farreid.data.label_view import LabelView
from farreid.data.loaders import compute_threads, eval_loader, select_rows, train_loader
from farreid.data.protocols import EvalSet, split_identities
from farreid.data.tracklets import Tracklet
from farreid.data.transforms import TrackletTransform, normalize_clip
from farreid.paths import DATA_ENV, from_env


class DetReIDXDataModule(L.LightningDataModule):
    """Training tracklets in P×K identity batches, a validation split carved from training identities, and the
    released case folders for ``test``/``predict``.

    The module owns distributed sampling (the CLI sets ``trainer.use_distributed_sampler=False``): training
    ranks draw disjoint identities from one :class:`IdentityBatchSampler`, evaluation ranks split the tracklets.

    Args:
        root: dataset root (``ROOT/train``, ``ROOT/case1_aerial_to_ground``, ...); falls back to the
            ``FARREID_DATA`` environment variable so that no machine path lives in a committed config.
        image_size: (height, width) fed to the backbone; 256×128 in the paper.
        num_frames: frames per training clip (T).
        num_frames_test: frames per evaluation clip; defaults to ``num_frames``.
        p: identities per batch. k: tracklets per identity.
        passes_per_epoch: how many times an epoch visits every training identity (P×K batches per epoch =
            passes × identities / P); raise it for small datasets so that epochs are not a handful of steps.
        val_share: share of training identities held out to re-create A2G/G2A/A2A for model selection.
        split_seed: seed of that split (independent of the training seed, so runs share one split).
        batch_size_test: clips per evaluation batch.
        num_workers: DataLoader workers.
        flip_p, erase_p, pad, color_jitter: training augmentation, decided once per tracklet.
        test_split: what ``test``/``predict`` evaluate: the released ``"cases"`` folders or the ``"val"`` split.
        test_frames: ``"even"``: each evaluation tracklet is one clip of ``num_frames_test`` evenly spaced frames;
            ``"all"``: every frame, as rows of ``num_frames_test`` consecutive frames whose features the evaluation
            averages per tracklet (the MARS protocol; memory stays one batch of rows).
        index_cache: keep each split's listing in a cache file validated by folder times (see
            :mod:`farreid.data.index_cache`); False lists the folders on every run and rank.
        index_cache_dir: where the cache files go; None: ``$XDG_CACHE_HOME/farreid/index`` or
            ``~/.cache/farreid/index`` (the dataset root may be read-only).
        compute_threads: torch intra-op threads of this process, set in ``setup``: None keeps torch's default
            (all cores), 0 the cores this process may use minus ``num_workers`` (at least 1), N sets N
            (docs/BENCHMARKS.md measures the choice on a small CPU machine).
        max_unreadable: share of an evaluation set's (or the training set's) tracklets that may have no
            decodable frame before the run stops with an error listing them (farreid choice: 1%, issue 10).
        classifier_size: the classifier width when this run does not train (``test``/``predict``: the farreid CLI
            reads it from the checkpoint, so no ``train/`` folder is needed); None = count training identities.
        dataset: the layout under ``root``: ``detreidx`` (default), ``agvpreid``, ``g2a``, ``mars``, ``lsvid``,
            ``ilidsvid``, ``prid``, ``dukevideo``, or the dotted path of a
            :class:`~farreid.data.datasets.VideoReIDDataset` subclass (see ``docs/DATASETS.md``).
        dataset_options: keyword options of that reader, e.g. ``{split_id: 3}`` for iLIDS-VID and PRID-2011.
        geometry: where each tracklet's altitude, distance and pitch come from (:mod:`farreid.data.geometry`): None =
            the frame names (:class:`~farreid.data.geometry.FileNameGeometry`), or a ``class_path`` such as
            ``farreid.data.geometry.CSVGeometry`` (a sidecar CSV) or
            ``farreid.data.geometry_predictor.PredictedGeometry`` (the ``aerialgeometry`` predictor).
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: tuple[int, int] = (256, 128),
        num_frames: int = 8,
        num_frames_test: int | None = None,
        p: int = 8,
        k: int = 4,
        passes_per_epoch: int = 1,
        val_share: float = 0.2,
        split_seed: int = 0,
        batch_size_test: int = 16,
        num_workers: int = 4,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        pad: int = 10,
        color_jitter: float = 0.0,
        test_split: Literal["cases", "val"] = "cases",
        test_frames: Literal["even", "all"] = "even",
        index_cache: bool = True,
        index_cache_dir: str | None = None,
        max_unreadable: float = 0.01,
        compute_threads: int | None = None,
        classifier_size: int | None = None,
        dataset: str = "detreidx",
        dataset_options: dict | None = None,
        geometry: GeometrySource | None = None,
    ) -> None:
        super().__init__()
        root = from_env(root, DATA_ENV)
        if not root:
            raise ValueError(f"data.root is not set: pass --data.root PATH or set {DATA_ENV}=PATH")
        for name, value in (("num_frames", num_frames), ("num_frames_test", num_frames_test), ("p", p), ("k", k)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if compute_threads is not None and compute_threads < 0:
            raise ValueError(f"data.compute_threads must be None, 0 (auto) or a positive count, got {compute_threads}")
        if not 0.0 <= max_unreadable <= 1.0:
            raise ValueError(f"data.max_unreadable must be a share in [0, 1], got {max_unreadable}")
        self.save_hyperparameters(ignore=["geometry"])
        self.geometry_source = FileNameGeometry() if geometry is None else geometry
        self._geometry_table: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.root = str(root)
        self.num_frames_test = num_frames if num_frames_test is None else num_frames_test
        self.train_set: TrackletDataset | None = None
        self.eval_sets: dict[str, EvalSet] = {}
        self.eval_datasets: dict[str, TrackletDataset] = {}
        self.cache_dir = (index_cache_dir or str(default_cache_dir())) if index_cache else None
        self._train_transform: TrackletTransform | None = None
        reader_class(dataset)  # an unknown name fails here, before any data is read

    @cached_property
    def reader(self) -> VideoReIDDataset:
        """The dataset reader (``data.dataset``), built on first use so that the root is checked when read."""
        return make_reader(self.hparams.dataset, self.root, self.cache_dir, self.hparams.dataset_options)

    # ----------------------------------------------------------------------------------------- splits
    @cached_property
    def _train_tracklets(self) -> list[Tracklet]:
        return self.reader.train_tracklets()

    def prepare_data(self) -> None:
        """Build the index cache of the splits this stage reads (Lightning runs this on one process per node and
        holds the other ranks at a barrier, so under DDP one rank lists and the others read its cache)."""
        if self.cache_dir is None:
            return
        fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        stage = getattr(fn, "value", "fit")
        for split in self.reader.cached_splits(stage, self.hparams.test_split):
            start = time.perf_counter()
            index = cached_split(self.root, split, self.cache_dir)
            rank_zero_info(
                f"[farreid] index of {split}: {len(index)} tracklets, {len(index.names)} frames "
                f"({time.perf_counter() - start:.2f} s; cache {cache_path(self.root, split, self.cache_dir)})"
            )

    @cached_property
    def _identity_split(self) -> tuple[list[int], list[int]]:
        pids = [t.pid for t in self._train_tracklets]
        return split_identities(pids, self.hparams.val_share, self.hparams.split_seed)

    @property
    def num_classes(self) -> int:
        """Number of training identities (after the validation hold-out): the classifier's width."""
        if self.hparams.classifier_size:
            return self.hparams.classifier_size
        return len(self._identity_split[0])

    def setup(self, stage: str) -> None:
        threads = compute_threads(self.hparams.compute_threads, self.hparams.num_workers)
        if threads is not None and threads != torch.get_num_threads():
            rank_zero_info(f"[farreid] {threads} compute threads (data.compute_threads={self.hparams.compute_threads})")
            torch.set_num_threads(threads)
        if stage == "fit" and self.train_set is None:
            train_pids, _ = self._identity_split
            label_of = {pid: i for i, pid in enumerate(train_pids)}
            tracklets = [t for t in self._train_tracklets if t.pid in label_of]
            self.train_set = TrackletDataset(
                self._prompted(tracklets),
                num_frames=self.hparams.num_frames,
                training=True,
                transform=self._transform(training=True),
                labels=[label_of[t.pid] for t in tracklets],
                seed=self.hparams.split_seed,
                max_unreadable=self.hparams.max_unreadable,
                geometry=self._geometry(tracklets, "train"),
            )
        if stage in ("fit", "validate") and "val" not in self.eval_sets and self.hparams.val_share > 0:
            _, val_pids = self._identity_split
            held_out = set(val_pids)
            held_out_tracklets = [t for t in self._train_tracklets if t.pid in held_out]
            self.eval_sets["val"] = self.reader.validation_cases(held_out_tracklets)
        if stage in ("test", "predict") and "test" not in self.eval_sets:
            if self.hparams.test_split == "val":
                self.setup("validate")
                self.eval_sets["test"] = self.eval_sets["val"]
            else:
                self.eval_sets["test"] = self.reader.test_set()
        for name, eval_set in self.eval_sets.items():
            rank_zero_info(f"[farreid] {name} set: {len(eval_set)} tracklets ({eval_set.describe()})")

    def _prompted(self, tracklets: list[Tracklet]) -> list[Tracklet]:
        """The tracklets as the model sees them: ``camid`` replaced by the reader's camera-prompt id (0 ground, 1/2
        aerial), so that one checkpoint's prompt table fits every dataset. The evaluation sets keep the protocol's
        cameras for the junk rule. DetReIDX's cameras are the prompt ids: its tracklets pass unchanged."""
        prompt = self.reader.prompt_camera
        if all(prompt(t) == t.camid for t in tracklets):
            return tracklets
        return [dataclasses.replace(t, camid=prompt(t)) for t in tracklets]

    def _geometry(self, tracklets: list[Tracklet], where: str) -> Geometry:
        """The tracklets' geometry from ``data.geometry``: file names per set; a sidecar or a predictor once over
        the whole dataset (training and released cases present under the root: a test-only release has no
        ``train/``), so that a CSV is checked against every tracklet."""
        source = self.geometry_source
        if isinstance(source, FileNameGeometry):
            return source.geometry(tracklets, self.reader, where)
        if self._geometry_table is None:
            every = []
            for part in (lambda: self._train_tracklets, lambda: self.reader.test_set().tracklets):
                try:
                    every += list(part())
                except FileNotFoundError:  # that split is not in this release
                    continue
            listed = {e.name for e in every}
            every += [t for t in tracklets if t.name not in listed]  # e.g. an evaluation folder of its own
            table = source.geometry(every, self.reader, "data.geometry")
            self._geometry_table = {t.name: (table.values[i], table.known[i]) for i, t in enumerate(every)}
        rows = [self._geometry_table[t.name] for t in tracklets]
        return Geometry(
            values=np.stack([r[0] for r in rows]).reshape(-1, len(QUANTITIES)),
            known=np.stack([r[1] for r in rows]).reshape(-1, len(QUANTITIES)),
        )

    # ------------------------------------------------------------------------------------ dataloaders
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """On the host: training items without any readable frame (``valid`` False) leave the batch.

        That happens only when an identity has no readable tracklet left to substitute; the dataset has counted
        and warned. Checked here, on the CPU copy, so the device step stays free of host syncs.
        """
        if isinstance(batch, dict) and "aug" in batch and "valid" in batch and not bool(batch["valid"].all()):
            batch = select_rows(batch, batch["valid"])
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the device: uint8 clips -> normalised floats, with the training augmentations applied batched."""
        if not isinstance(batch, dict) or "frames" not in batch or batch["frames"].dtype != torch.uint8:
            return batch
        params = batch.pop("aug", None)
        if params is None:
            batch["frames"] = normalize_clip(batch["frames"])
        else:
            if self._train_transform is None:
                self._train_transform = self._transform(training=True)
            batch["frames"] = self._train_transform.augment(batch["frames"], params)
        return batch

    def unreadable_counts(self) -> dict[str, int]:
        """Tracklets without a decodable frame found so far, per dataset ("train" and each evaluation set)."""
        counts = {name: d.num_unreadable for name, d in self.eval_datasets.items()}
        if self.train_set is not None:
            counts["train"] = self.train_set.num_unreadable
        return counts

    def _transform(self, training: bool) -> TrackletTransform:
        h = self.hparams
        augment = {"flip_p": h.flip_p, "erase_p": h.erase_p, "pad": h.pad, "color_jitter": h.color_jitter}
        return TrackletTransform(image_size=tuple(h.image_size), training=training, **(augment if training else {}))

    def train_dataloader(self) -> DataLoader:
        h, trainer = self.hparams, self.trainer
        return train_loader(
            self.train_set,
            p=h.p,
            k=h.k,
            passes_per_epoch=h.passes_per_epoch,
            seed=h.split_seed if trainer is None else int(os.environ.get("PL_GLOBAL_SEED", h.split_seed)),
            num_workers=h.num_workers,
            trainer=trainer,
        )

    def _eval_loader(self, name: str) -> DataLoader:
        if name not in self.eval_sets:
            raise RuntimeError(f"no {name!r} evaluation set: is data.val_share > 0 (validation)?")
        if name not in self.eval_datasets:
            self.eval_datasets[name] = TrackletDataset(
                self._prompted(self.eval_sets[name].tracklets),
                num_frames=self.num_frames_test,
                training=False,
                transform=self._transform(training=False),
                dense=self.hparams.test_frames == "all",
                max_unreadable=self.hparams.max_unreadable,
                geometry=self._geometry(self.eval_sets[name].tracklets, name),
            )
        trainer = self.trainer
        return eval_loader(
            self.eval_datasets[name],
            batch_size=self.hparams.batch_size_test,
            num_workers=self.hparams.num_workers,
            world_size=1 if trainer is None else trainer.world_size,
            rank=0 if trainer is None else trainer.global_rank,
        )

    # ------------------------------------------------ stage 1 on cached features (issue 11, farreid.module)
    def cached_feature_loader(self) -> DataLoader:
        """Switch training to labels only and return the loader to compute stage 1's cached image features from.

        After the call, training items carry ``index``/``label``/``pid``/``camid`` and no frame is decoded
        (:class:`LabelView`). The returned loader yields every training tracklet once as an un-augmented clip
        (evaluation frame selection, uint8 frames to normalise on the device, the training ``num_frames``), its
        ``index`` the row of the cache.
        """
        if self.train_set is None:
            self.setup("fit")
        base = self.train_set.dataset if isinstance(self.train_set, LabelView) else self.train_set
        clips = TrackletDataset(
            base.tracklets,
            num_frames=self.hparams.num_frames,
            training=False,
            transform=self._transform(training=False),
            labels=base.labels,
            max_unreadable=self.hparams.max_unreadable,
            geometry=base.geometry,
        )
        self.train_set = LabelView(base, decoded=clips)
        return DataLoader(clips, batch_size=self.hparams.batch_size_test, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.eval_sets else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def eval_set(self, stage: str) -> EvalSet:
        """The :class:`EvalSet` evaluated in a Lightning stage ("validate"/"fit" -> val, "test"/"predict")."""
        return self.eval_sets["val" if stage in ("fit", "validate", "sanity_check") else "test"]
