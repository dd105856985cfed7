"""The training step replayed as a CUDA graph (`train.py --cuda-graph`).

UltimusNet is tiny: at the training batch a step is ~200 small kernels, and the GPU waits on Python
launching them. A CUDA graph records the step's kernels once and replays them with one launch. The
step (`loop.train_step`) is written for it: every counter it updates is a device tensor updated in
place, and it makes no tensor from a host value. What else a replayed step needs, and where it is:

- the learning rate and Adam's beta1 computed on the device (training/device_schedule.py), read by
  `Adam(capturable=True, foreach=False)` from tensors (a Python float written into a param group would
  be frozen at its capture-time value; foreach Adam reads a tensor beta1 back to the host);
- the same input tensors at every replay: each batch is copied into the graph's own;
- the augmentation's generator registered with the graph, so each replay draws fresh numbers (the
  default generator, which dropout uses, is registered by PyTorch itself);
- warm-up steps before capture (Triton's JIT, cuDNN's autotuning, the optimiser's lazily made state)
  run eagerly on a side stream, as PyTorch's whole-network capture recipe does. They are real steps
  of the run: nothing is run twice, nothing skipped;
- a batch of another size (an epoch's last, partial batch) runs eagerly, through the same step and
  the same tensors: every image of the epoch is trained on.

A step that cannot be captured (an error while capturing) is reported once and the run continues
eagerly, so a run never fails because of the graph.
"""

from __future__ import annotations

import warnings

import torch

WARMUP_STEPS = 3


class GraphedTrainStep:
    """Calls `step(images, labels)` eagerly for the first WARMUP_STEPS batches, captures it on the
    next full-size batch, then replays the graph for every batch of that size."""

    def __init__(self, step, generator: torch.Generator):
        self.step, self.generator = step, generator
        self.graph = None
        self.images = self.labels = None  # the graph's inputs
        self.calls = 0
        self.failed = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.calls += 1
        if self.graph is not None and images.shape == self.images.shape and labels.shape == self.labels.shape:
            self.images.copy_(images, non_blocking=True)
            self.labels.copy_(labels, non_blocking=True)
            self.graph.replay()
            return
        if self.failed or self.graph is not None or self.calls <= WARMUP_STEPS:
            self._eager(images, labels)
            return
        self._capture(images, labels)

    def _eager(self, images, labels) -> None:
        if self.graph is None and not self.failed:  # warm-up: on a side stream, as the recipe says
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(images, labels)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.step(images, labels)

    def _capture(self, images, labels) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(self.generator)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                self.step(self.images, self.labels)
        except Exception as exc:  # the run goes on eagerly
            self.failed, self.images, self.labels = True, None, None
            torch.cuda.synchronize()
            warnings.warn(f"--cuda-graph: the training step could not be captured ({exc}); running it eagerly")
            self.step(images, labels)
            return
        self.graph = graph
        graph.replay()  # capturing recorded the step without running it: run it for this batch
