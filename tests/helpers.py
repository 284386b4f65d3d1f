"""Small shared pieces for the core tests."""
import json
import os
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

import timm_fslt


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def fit(model, inputs, target, steps=40, lr=0.5, loss_fn=None):
    """A plain training loop on a fixed batch; returns (first loss, last loss)."""
    loss_fn = loss_fn or F.cross_entropy
    opt = torch.optim.SGD(trainable(model), lr=lr, momentum=0.9, weight_decay=1e-4)
    first = None
    for _ in range(steps):
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss = loss_fn(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        return first, loss_fn(out, target).item()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def masks(model):
    return [layer.mask.clone() for layer in timm_fslt.get_group(model).layers]


def copy_dir(src, dst):
    """``dst`` replaced by a copy of the directory ``src`` (returns ``dst``)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def read_jsonl(path) -> list:
    """The records of a JSONL file (metrics.jsonl), blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reset_accelerate():
    """Forget Accelerate's process-wide singletons, so that the next run builds its own state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def one_thread_fresh_accelerate():
    """Body of the autouse fixture of the training tests: one thread (these models are tiny, and
    OpenMP threads only add contention), and fresh Accelerate state after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


def killed_at(at_batch: int):
    """A ClassificationTask that dies (like a SIGINT) at its n-th training batch: a run killed mid-epoch."""
    from timm_fslt.training import ClassificationTask

    class KilledAt(ClassificationTask):
        def __init__(self):
            super().__init__()
            self.at, self.seen = at_batch, 0

        def loss(self, model, batch):
            self.seen += 1
            if self.seen == self.at:
                raise KeyboardInterrupt("killed")
            return super().loss(model, batch)

    return KilledAt()


def layer_scores(model) -> dict:
    """{layer name: a copy of its scores} of a frozen model."""
    return {layer.layer_name: layer.scores.detach().clone() for layer in timm_fslt.get_group(model).layers}


def four_class_images(n=48, seed=0):
    """A tiny 4-class image set (3x32x32) whose classes differ in mean brightness: learnable in a few steps."""
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() * 0.3
    return TensorDataset(x, y)


def assert_trains_alike(base, twin, x, y, steps: int, lr: float) -> None:
    """Train two frozen models side by side (momentum SGD on a fixed batch): after every backward
    their masks, scales and score gradients must be equal, bit for bit."""
    opts = [torch.optim.SGD(trainable(m), lr=lr, momentum=0.9) for m in (base, twin)]
    for _ in range(steps):
        for model in (base, twin):
            F.cross_entropy(model(x), y).backward()
        for a, b in zip(timm_fslt.get_group(base).layers, timm_fslt.get_group(twin).layers):
            assert torch.equal(a.mask, b.mask) and torch.equal(a.scale, b.scale)
            assert torch.equal(a.scores.grad, b.scores.grad)
        for opt in opts:
            opt.step()
            opt.zero_grad()


def outputs_across_kernel_paths(child: str) -> list:
    """The stdout of the script ``child`` run in a fresh process under ``ATEN_CPU_CAPABILITY=default``
    with 1 thread, ``avx2`` with 2 and the machine's own path with 2 (the env var ``THREADS``)."""
    outputs = []
    for capability, threads in (("default", "1"), ("avx2", "2"), (None, "2")):
        env = {**os.environ, "OUTDATED_IGNORE": "1", "THREADS": threads}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout)
    return outputs
