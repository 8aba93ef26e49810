"""learner.weight_channel = shared_folder (one host): a safetensors file per version in a folder every engine can
read (tmpfs at /dev/shm when it exists), announced through Redis; engines `load_weights(folder)`."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from resetrl.run_state import RunKeys, announce_weights
from resetrl.weights.base import WEIGHT_CHANNELS, WEIGHTS_FILE, WeightChannel, cpu_tensors, default_weights_root

_VERSION_DIR = re.compile(r"^v(\d{6,})$")


@WEIGHT_CHANNELS.register("shared_folder")
class SharedFolderWeightChannel(WeightChannel):
    """Versions as `root_dir/v{version:06d}/model.safetensors`; Redis hash keys.weights = {version, path}.

    A version folder appears complete or not at all (written under a temporary name in root_dir, then renamed),
    and only the newest `keep` versions are kept on disk. `keep` must outlast the slowest engine's load: an engine
    that lags more versions than that behind would find its folder gone (it then simply asks latest() again).
    """

    def __init__(self, root_dir: str | Path | None, redis_client, keys: RunKeys, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (got {keep})")
        super().__init__(redis_client, keys)
        self.root_dir = Path(root_dir) if root_dir is not None else default_weights_root(keys.run_name)
        self.keep = keep

    @classmethod
    def for_learner(cls, cfg, client, keys: RunKeys, weights_root) -> "SharedFolderWeightChannel":
        return cls(weights_root, client, keys)

    @classmethod
    def for_engine(cls, cfg, client, keys: RunKeys, weights_root, worker_index: int):
        from resetrl.actors.engines.weight_receivers import SharedFolderWeightReceiver

        return SharedFolderWeightReceiver(client, keys)

    def version_dir(self, version: int) -> Path:
        return self.root_dir / f"v{version:06d}"

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        final = self.version_dir(version)
        tensors = cpu_tensors(state_dict)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root_dir))
        try:
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "version": str(version)})
            if final.exists():  # re-publishing a version (a learner restarted from a checkpoint)
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        announce_weights(self.client, self.keys, version, str(final))
        self._prune(newest=version)
        return str(final)

    def _prune(self, newest: int) -> None:
        versions = []
        for child in self.root_dir.iterdir():
            match = _VERSION_DIR.match(child.name)
            if match and int(match.group(1)) <= newest:
                versions.append(int(match.group(1)))
        for old in sorted(versions)[: -self.keep]:
            shutil.rmtree(self.version_dir(old), ignore_errors=True)
