"""Checkpoints: save, verify, load and prune, over a dict of stateful parts (after torchtitan's CheckpointManager).

A checkpoint is a directory ``<dir>/step-NNNNNNNN`` holding the files of its parts: a part is *per rank* (every
rank writes its own files, or takes part in a collective save: model shards, optimizer, RNG, data stream position)
or *global* (rank 0 writes it: the trainer state). Saving:

1. every part writes into ``step-N.tmp`` (a kill mid-save leaves only a ``.tmp`` directory, never counted);
2. the ranks hash the files (each rank a share) and rank 0 writes ``manifest.json``: name, size and sha256 of every
   file;
3. rank 0 renames ``step-N.tmp`` to ``step-N`` and prunes the oldest complete checkpoints beyond ``keep_last``.

A write that fails (disk full, quota, permissions) raises :class:`CheckpointError` on every rank, naming the
checkpoint directory, the cause and the free space left; the partial ``.tmp`` directory is removed so the space is
given back (to the MLflow store, the logs, the next save).

Before a checkpoint is used it is *verified* (each rank a share of the files): every file of the manifest present,
with its size and sha256. ``resume: auto`` takes the newest checkpoint that verifies and warns, naming the bad
file, for each newer one it skips (a truncated or missing file from a crash, a full disk, a bad copy). An explicit
``resume: <path>`` that does not verify is an error.

Nothing in a checkpoint is executed. DeepSpeed and Accelerate read their states with ``torch.load(...,
weights_only=False)``, which runs whatever a crafted pickle asks for. So before any part is loaded, every pickle in
the checkpoint is read with ``torch.load(weights_only=True)`` - PyTorch's restricted unpickler, which imports no
global and calls no function outside an allow-list - under :data:`SAFE_GLOBALS`, exactly the types that DeepSpeed
and Accelerate store. A pickle that refers to anything else is refused (:class:`UnsafeCheckpointError`) before the
permissive loader sees it. The sha256 manifest is not a defence against someone who can write the checkpoint (they
can write the manifest too); the restricted read is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lancer_dist import dist
from lancer_dist.config import ConfigError, RunConfig
from lancer_dist.fileio import atomic_write_json

log = logging.getLogger("lancer.train")

__all__ = [
    "CKPT_PREFIX",
    "MANIFEST",
    "CheckpointError",
    "CheckpointManager",
    "Part",
    "UnsafeCheckpointError",
    "check_pickles",
    "file_digest",
    "load_zero_resharded",
    "verify_files",
]

CKPT_PREFIX = "step-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_PART_MANIFEST = "manifest.part-rank{rank:05d}.json"
_BLOCK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is incomplete or corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickle that refers to code outside the allow-list: it is never loaded."""


@dataclass
class Part:
    """One stateful piece of a checkpoint: ``save(dir)`` writes its files into the checkpoint directory,
    ``load(dir)`` restores from them. ``per_rank``: called on every rank (per-rank files, or a collective save such
    as a ZeRO engine's); otherwise rank 0 alone writes it (global files) and every rank loads it."""

    save: Callable[[Path], None]
    load: Callable[[Path], None]
    per_rank: bool = True


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under ``root`` (relative POSIX paths, sorted), manifests excluded."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith("manifest.part-rank"):
            out.append(rel)
    return sorted(out)


def verify_files(root: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Problems of ``names`` (a share of the manifest's files) in ``root``: missing, wrong size, wrong sha256."""
    problems = []
    files = manifest["files"]
    for name in names:
        want = files[name]
        p = root / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{p}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{p}: {size} bytes, the manifest says {want['size']} (truncated or replaced)")
        elif file_digest(p) != want["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest (corrupt or replaced)")
    return problems


# ---- restricted reading of pickles ----------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """The types DeepSpeed and Accelerate pickle into a checkpoint besides tensors and containers: found by reading
    every file of a ZeRO-0..3 / DDP checkpoint with ``weights_only=True`` (tests/unit/test_checkpoint.py and
    tests/integration/test_train_reliability.py keep the list exact)."""
    import numpy as np

    try:  # numpy 2 pickles numpy._core.multiarray._reconstruct; numpy 1 numpy.core.multiarray._reconstruct
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    # Accelerate's random_states_<rank>.pkl: Python / numpy RNG states
    out: list[Any] = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    if (
        "deepspeed" not in sys.modules
    ):  # not a DeepSpeed run (importing it costs seconds): its types are not needed
        return out
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return out
    return [*out, ZeroStageEnum, LossScaler, fragment_address]


def _is_pickle(path: Path) -> bool:
    """A torch zip archive, or a (legacy torch / plain) pickle stream."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def check_pickles(root: Path, names: list[str]) -> list[str]:
    """Problems of the pickles among ``names`` in ``root``: each is read with PyTorch's weights-only unpickler and
    :func:`_safe_globals`, which executes nothing; anything it refuses is reported with the file's name."""
    import torch

    problems = []
    allowed = _safe_globals()
    for name in names:
        p = root / name
        if not p.is_file() or not _is_pickle(p):
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
            msg = str(e)
            # the line of torch's message that names the refused global
            why = next(
                (ln.strip() for ln in msg.splitlines() if "nsupported" in ln or "but got" in ln),
                msg.splitlines()[0] if msg else type(e).__name__,
            )
            problems.append(f"{p}: refused by the weights-only reader ({why[:300]})")
    return problems


# ---- the manager ----------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, verifies, loads and prunes the checkpoints in ``directory`` made of ``parts`` (saved and loaded in
    the dict's order)."""

    def __init__(
        self,
        directory: str | Path,
        parts: dict[str, Part],
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        marker: str = "trainer_state.json",
    ):
        self.directory = Path(directory)
        self.parts = parts
        self.rank, self.world = rank, world_size
        self.keep_last = keep_last
        # a file every checkpoint has: a directory with it but no manifest is an older lancer's (not verifiable)
        self.marker = marker

    def path(self, step: int) -> Path:
        return self.directory / f"{CKPT_PREFIX}{step:08d}"

    # ---- saving ----------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        error = None
        if self.rank == 0:
            error = self._try(tmp, lambda: _fresh_dir(tmp))
        self._agree(error, tmp)
        for name, part in self.parts.items():
            if part.per_rank or self.rank == 0:
                error = self._try(tmp, _bind(part.save, tmp), what=name)
            self._agree(error, tmp)
        # every rank hashes a share of the files; rank 0 merges the shares into the manifest
        error = self._try(tmp, lambda: self._write_part_manifest(tmp), what="manifest")
        self._agree(error, tmp)
        if self.rank == 0:
            error = self._try(tmp, lambda: self._finish(tmp, final), what="manifest")
        self._agree(error, tmp)
        log.info("checkpoint saved: %s", final)
        return final

    def _try(self, tmp: Path, fn: Callable[[], Any], what: str = "directory") -> str | None:
        try:
            fn()
        except Exception as e:  # any failure to write must reach every rank, never leave one in a collective
            return f"{what}: {type(e).__name__}: {e}"
        return None

    def _agree(self, error: str | None, tmp: Path) -> None:
        """All ranks learn whether any rank failed; then all raise, naming the checkpoint and the free space."""
        errors = [str(e) for e in dist.all_gather_object(error) if e]
        if not errors:
            return
        free = ""
        try:  # measured before the partial checkpoint is removed: what the failed write saw
            st = os.statvfs(tmp if tmp.exists() else self.directory)
            avail, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            free = f"; {avail / 2**20:.1f} MiB of {total / 2**20:.1f} MiB free on that filesystem"
            if avail < max(64 * 2**20, total // 100):
                free += " (the disk is full)"
        except OSError:
            pass
        dist.barrier()  # every rank has looked before rank 0 removes the partial checkpoint
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back (MLflow store, logs, the next save)
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        raise CheckpointError(
            f"cannot write checkpoint {final} (being written in {tmp}): {errors[0].splitlines()[0][:500]}"
            f"{free}. The partial checkpoint was removed; earlier checkpoints are intact."
        )

    def _write_part_manifest(self, tmp: Path) -> None:
        names = _files(tmp)[self.rank :: self.world]
        entries = {n: {"size": (tmp / n).stat().st_size, "sha256": file_digest(tmp / n)} for n in names}
        (tmp / _PART_MANIFEST.format(rank=self.rank)).write_text(json.dumps(entries))

    def _finish(self, tmp: Path, final: Path) -> None:
        files: dict[str, Any] = {}
        for r in range(self.world):
            part = tmp / _PART_MANIFEST.format(rank=r)
            files.update(json.loads(part.read_text()))
            part.unlink()
        manifest = {"format": MANIFEST_FORMAT, "world_size": self.world, "files": dict(sorted(files.items()))}
        atomic_write_json(tmp / MANIFEST, manifest, fsync=True, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(self.directory)
        self.prune()

    def prune(self) -> None:
        for old in self.candidates()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- finding and verifying ------------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """Finished checkpoint directories (renamed from .tmp), oldest first; not verified yet."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p
            for p in self.directory.glob(f"{CKPT_PREFIX}*")
            if p.is_dir()
            and not p.name.endswith(".tmp")
            and ((p / MANIFEST).is_file() or (p / self.marker).is_file())
        )

    def verify(self, path: Path) -> list[str]:
        """Every rank's problems with ``path`` (the same list on every rank); [] when it is complete and safe."""
        mine: list[str] = []
        manifest_path = path / MANIFEST
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
                names = sorted(manifest["files"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                manifest, names = None, []
                mine = [f"{manifest_path}: unreadable ({e})"] if self.rank == 0 else []
            if manifest is not None:
                share = names[self.rank :: self.world]
                mine = verify_files(path, manifest, share)
                if not mine:
                    mine = check_pickles(path, share)
        else:
            names = _files(path)
            if self.rank == 0:
                log.warning(
                    "checkpoint %s has no %s (an older lancer wrote it): its files are not verified",
                    path,
                    MANIFEST,
                )
            mine = check_pickles(path, names[self.rank :: self.world])
        out: list[str] = []
        for problems in dist.all_gather_object(mine):
            out.extend(problems)  # type: ignore[arg-type]
        return out

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: ``"never"`` -> None; a path -> it, verified (else an error); ``"auto"`` ->
        the newest that verifies, warning about each newer one skipped (None when there is none)."""
        if resume == "never":
            return None
        if resume != "auto":
            p = Path(resume)
            if not ((p / MANIFEST).is_file() or (p / self.marker).is_file()):
                raise ConfigError(
                    "train.checkpoint.resume", resume, "'auto', 'never' or a complete checkpoint"
                )
            problems = self.verify(p)
            if problems:
                self._raise_if_unsafe(problems)
                raise ConfigError(
                    "train.checkpoint.resume", resume, f"a complete checkpoint; {'; '.join(problems[:5])}"
                )
            return p
        for p in reversed(self.candidates()):
            problems = self.verify(p)
            if not problems:
                return p
            self._raise_if_unsafe(problems)
            if self.rank == 0:
                log.warning(
                    "skipping checkpoint %s: %s%s; falling back to the previous complete checkpoint",
                    p,
                    "; ".join(problems[:5]),
                    f" (and {len(problems) - 5} more)" if len(problems) > 5 else "",
                )
        return None

    def _raise_if_unsafe(self, problems: list[str]) -> None:
        unsafe = [p for p in problems if "weights-only reader" in p]
        if unsafe:
            raise UnsafeCheckpointError(
                "refusing to load a checkpoint that holds code outside the allow-list of the types DeepSpeed and "
                "Accelerate store (it was not unpickled; nothing in it ran): " + "; ".join(unsafe[:5])
            )

    # ---- loading --------------------------------------------------------------------------------------

    def load(self, path: Path, verified: bool = False) -> None:
        """Verify ``path`` (unless the caller just did) and load every part from it."""
        if not verified:
            problems = self.verify(path)
            if problems:
                self._raise_if_unsafe(problems)
                raise CheckpointError(f"checkpoint {path} is incomplete: {'; '.join(problems[:5])}")
        for part in self.parts.values():
            part.load(path)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.candidates())


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _bind(fn: Callable[[Path], None], path: Path) -> Callable[[], None]:
    return lambda: fn(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2 on another world size
# --------------------------------------------------------------------------------------------------------------


def load_zero_resharded(
    engine: Any, cfg: RunConfig, path: Path, saved_world: int, *, rank: int, world: int
) -> None:
    """A ZeRO-1/2 checkpoint of another world size: DeepSpeed refuses to re-partition its optimizer state
    directly, so rank 0 converts it to DeepSpeed's universal checkpoint (``ds_to_universal``: one file per
    parameter for the fp32 weights and each Adam moment, cached next to the checkpoint) and every rank loads
    its new partition from that (``load_universal``) into ``engine`` (the run's DeepSpeed engine). RNG states are not
    restored (one per old rank)."""
    from lancer_dist.train.parallel import deepspeed_config

    zero = deepspeed_config(cfg, world)["zero_optimization"]
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2) or zero.get("elastic_checkpoint"):
        raise ConfigError(
            "train.checkpoint.resume",
            str(path),
            f"a checkpoint written with the same world size ({saved_world}, now {world}): "
            + (
                f"ZeRO-{stage} parameter shards are not re-partitioned by this trainer"
                if stage not in (1, 2)
                else "an elastic_checkpoint cannot be converted to a universal checkpoint"
            ),
        )
    universal = path / "universal"
    if rank == 0 and not (universal / "pytorch_model" / "zero").is_dir():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = path / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(
            Namespace(
                input_folder=str(path / "pytorch_model"),
                output_folder=str(tmp / "pytorch_model"),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # Accelerate does not store Megatron's universal_checkpoint_info; DeepSpeed fills the default
                inject_missing_state=True,
            )
        )
        shutil.rmtree(universal, ignore_errors=True)
        tmp.rename(universal)
    dist.barrier()
    engine_cfg = engine._config
    engine_cfg.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(
            str(universal), tag="pytorch_model", load_lr_scheduler_states=False
        )
    finally:
        engine_cfg.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
