"""The study's sampling and Inception features, split over the processes of `torchrun --nproc_per_node N -m analysis
study`."""
import torch

from ldm_lite.distributed import World, share
from ldm_lite.models import load_unet
from ldm_lite.models.inception import FEATURE_DIM, load_fid_inception
from ldm_lite.quality import inception_features
from ldm_lite.sampling import sample
from ldm_lite.schedulers import from_config
from ldm_lite.study.config import QualityStudyConfig


PER_SAMPLE = ("x_T", "class_labels", "leak")  # sample() keywords that may hold one row per sample


def _rows(value, rows: range):
    """A sample() keyword's rows for samples `rows`: a list or a tensor with one row per sample is sliced (a leak
    only as (n, C, H, W) images); one value for all (an int label, LeakStats, a (C, H, W) leak) stays whole."""
    if isinstance(value, (list, tuple)):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor) or value.dim() in (0, 3):
        return value
    return value[rows.start:rows.stop]


class Shards:
    """The study's sampling and Inception features, split over the processes of `torchrun --nproc_per_node N -m
    analysis study` (with one process, everything runs here, unsplit).

    Rank 0 runs the study. Each draw of n samples and each feature computation is a job sent to every rank; a rank
    computes its share (`distributed.share`: a contiguous block; sample i still draws from sample_seed(seed, i),
    so the images do not depend on the number of processes) and all_gather_object collects the shares in rank
    order. The other ranks wait in `serve()` until `close()`. Rank 0's models are the trained ones; the others load
    each from its run folder the first time a job names it."""

    def __init__(self, world: World, device: torch.device, config: QualityStudyConfig, network=None):
        self.world, self.device, self.config, self.network = world, device, config, network
        self.models = {}

    def draw(self, trained: dict, scheduler, n: int, steps: int, autocast_dtype, **kwargs) -> torch.Tensor:
        """n samples (n, C, H, W) in [-1, 1] on the CPU, as `ldm_lite.sampling.sample` draws them (the study's seed
        and evaluation batch), from `trained` (a dict of `load_trained`) with `scheduler`."""
        self.models.setdefault(str(trained["run_dir"]), trained["model"])
        # its config, not the object: a multistep scheduler holds the last batch's outputs (on the device)
        scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}
        return self._run(dict(kind="draw", run_dir=str(trained["run_dir"]), scheduler=scheduler_config, n=n,
                              steps=steps, autocast_dtype=autocast_dtype, kwargs=kwargs))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Inception features (N, 2048) of uint8 images (N, C, H, W) (`ldm_lite.quality.inception_features`)."""
        return self._run(dict(kind="features", n=len(images), images=images))

    def serve(self) -> None:
        """Ranks other than 0: do the jobs rank 0 sends until it closes."""
        while (job := self._broadcast(None)) is not None:
            self._gather(self._share(job))

    def close(self) -> None:
        if self.world.size > 1:
            self._broadcast(None)

    def _run(self, job: dict) -> torch.Tensor:
        if self.world.size == 1:
            return self._share(job)
        self._broadcast(job)
        return self._gather(self._share(job))

    def _broadcast(self, job):
        box = [job]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        parts = [None] * self.world.size
        torch.distributed.all_gather_object(parts, part)
        return torch.cat(parts)

    def _share(self, job: dict) -> torch.Tensor:
        """This rank's block of the job's n rows, on the CPU."""
        mine, c = share(job["n"], self.world), self.config
        progress = c.progress and self.world.is_main
        if job["kind"] == "features":
            if not mine:
                return torch.empty(0, FEATURE_DIM)
            if self.network is None:
                self.network = load_fid_inception(self.device)
            return inception_features(job["images"][mine.start:mine.stop], device=self.device, progress=progress,
                                      network=self.network)
        model = self.models.get(job["run_dir"])
        if model is None:
            model = self.models[job["run_dir"]] = load_unet(job["run_dir"]).to(self.device).eval()
        if not mine:
            size = model.config.sample_size
            return torch.empty(0, model.config.in_channels, size, size)
        kwargs = {name: _rows(value, mine) if name in PER_SAMPLE else value for name, value in job["kwargs"].items()}
        return sample(model, from_config(job["scheduler"]), len(mine), num_inference_steps=job["steps"], seed=c.seed,
                      first_index=mine.start, batch_size=c.eval_batch_size, progress=progress, device=self.device,
                      autocast_dtype=job["autocast_dtype"], **kwargs).clamp(-1, 1).cpu()
