"""What storing a ticket's state in bfloat16 or float16 costs in accuracy, and what it saves.

Part 1 (accuracy): a BatchNorm-heavy timm model (``mobilenetv3_small_050``, 10 classes, one input
channel) frozen with prune = lock = 0.35 and searched for a few epochs on scikit-learn's shipped
8x8 digits (upsampled to 32x32; 1,297 train / 500 test images, a fixed split), once per seed. Its
ticket is saved with ``state_dtype=None``, ``"bfloat16"`` and ``"float16"`` and loaded again; for
each: test accuracy, the largest logit difference against the full-precision ticket, the
predictions that change, and the ticket's bits and compression against a dense-source ticket.
Each loaded lower-precision ticket is checked to equal the searched model with its state rounded
(``state_codec.round_state``), and the full-precision one to equal the searched model. For
comparison, the same state rounded to the two 8-bit floats (no ticket option: rounded in memory
only) shows why 16 bits is the floor offered.

Part 2 (sizes): the state of a few mobile timm families as timm builds them with 10 classes
(as in issue #14's sweep; frozen 0.35/0.35, no search: sizes do not depend on the values), as
format 2 wrote it (one safetensors tensor per key, ``num_batches_tracked`` included), as format 3
writes it (flat, no batch counters), and flat with bfloat16.

    python benchmarks/state_precision.py                          # both parts, ~6 min on 2 cores
    python benchmarks/state_precision.py --seeds 0 --epochs 1 --skip sizes   # smoke run
    python benchmarks/state_precision.py --json benchmarks/results/state_precision.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import timm_fslt
from timm_fslt.report import non_regenerable_state
from timm_fslt.ticket import read_config, size_report_from_config
from timm_fslt.ticket.state_codec import encode_state, round_state

FAMILIES = ("test_efficientnet", "ghostnet_050", "lcnet_050", "mobilenetv3_small_050", "repghostnet_050",
            "repvit_m0_9", "rexnet_100")
STATE_DTYPES = (None, "bfloat16", "float16")
ROUNDED_ONLY = ("float8_e5m2", "float8_e4m3fn")  # measured, not offered


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def digits(size: int):
    """scikit-learn's 1,797 8x8 digits at ``size`` x ``size``, standardised, a fixed 1,297/500 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def search(model_name: str, seed: int, epochs: int, lr: float, data) -> torch.nn.Module:
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=10, in_chans=1)
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps_per_epoch = math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), 64):
            batch = perm[i:i + 64]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def logits(model, x):
    model.eval()
    return torch.cat([model(x[i:i + 250]) for i in range(0, len(x), 250)])


def accuracy_run(model_name: str, seed: int, epochs: int, lr: float, data) -> dict:
    start = time.perf_counter()
    model = search(model_name, seed, epochs, lr, data)
    search_seconds = time.perf_counter() - start
    x_test, y_test = data[2], data[3]
    reference = logits(model, x_test)
    out = {"seed": seed, "search_seconds": round(search_seconds, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        full = None
        for state_dtype in STATE_DTYPES:
            directory = timm_fslt.save_ticket(model, Path(tmp) / str(state_dtype), state_dtype=state_dtype)
            loaded = logits(timm_fslt.load_ticket(directory), x_test)
            expected = reference if state_dtype is None else logits(
                round_state(copy.deepcopy(model), state_dtype), x_test)
            assert torch.equal(loaded, expected), f"{state_dtype}: the loaded ticket is not the rounded model"
            full = loaded if state_dtype is None else full
            report = size_report_from_config(read_config(directory))
            files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
            out[str(state_dtype)] = {
                "accuracy": float((loaded.argmax(1) == y_test).float().mean()),
                "max_abs_logit_diff_vs_fp32": float((loaded - full).abs().max()),
                "max_abs_logit": float(full.abs().max()),
                "predictions_changed": int((loaded.argmax(1) != full.argmax(1)).sum()),
                "mask_bits": report.mask_bits, "state_bits": report.state_bits,
                "ticket_bits": report.ticket_bits, "ticket_bytes": (report.ticket_bits + 7) // 8,
                "state_share": report.state_bits / report.ticket_bits,
                "compression_vs_dense_source": report.compression_vs_dense_source,
                "file_bytes": files}
        for name in ROUNDED_ONLY:
            rounded = copy.deepcopy(model)
            with torch.no_grad():
                for tensor in non_regenerable_state(rounded).values():
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(getattr(torch, name)).to(tensor.dtype))
            got = logits(rounded, x_test)
            out[name] = {"accuracy": float((got.argmax(1) == y_test).float().mean()),
                         "max_abs_logit_diff_vs_fp32": float((got - full).abs().max()),
                         "predictions_changed": int((got.argmax(1) != full.argmax(1)).sum()),
                         "non_finite_outputs": int((~torch.isfinite(got)).sum())}
    return out


def _summary(runs: list, label: str) -> dict:
    """Accuracy in % over the seeds: mean, sample std, range, and the per-seed change against fp32."""
    acc = torch.tensor([r[label]["accuracy"] for r in runs], dtype=torch.float64) * 100
    full = torch.tensor([r["None"]["accuracy"] for r in runs], dtype=torch.float64) * 100
    out = {"accuracy_mean": round(float(acc.mean()), 2),
           "accuracy_std": round(float(acc.std()), 2) if len(acc) > 1 else 0.0,
           "accuracy_min": round(float(acc.min()), 2), "accuracy_max": round(float(acc.max()), 2),
           "accuracy_change_vs_fp32": [round(float(d), 2) for d in acc - full],
           "max_abs_logit_diff_vs_fp32": max(r[label]["max_abs_logit_diff_vs_fp32"] for r in runs),
           "predictions_changed": [r[label]["predictions_changed"] for r in runs]}
    first = runs[0][label]
    out.update({k: first[k] for k in ("ticket_bytes", "state_bits", "state_share", "compression_vs_dense_source",
                                      "file_bytes") if k in first})
    return out


def sizes(name: str) -> dict:
    """State file bytes as format 2 wrote them (one tensor per key, ``num_batches_tracked`` included)
    and as format 3 writes them (flat, what ``non_regenerable_state`` lists), also with bfloat16."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    timm_fslt.freeze(model, prune=0.35, lock=0.35)
    report = timm_fslt.size_report(model)
    state = non_regenerable_state(model)
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    old = {**state, **counters}
    mask_file = len(safetensors.torch.save({"supermask": torch.zeros((report.mask_bits + 7) // 8, dtype=torch.uint8)},
                                           metadata={"format": "timm_fslt.supermask"}))  # as save_ticket writes it
    per_tensor = safetensors.torch.save({k: v.contiguous() for k, v in old.items()},
                                        metadata={"format": "timm_fslt.state"})
    rows = {"format2_per_tensor": (len(per_tensor), sum(t.numel() * t.element_size() * 8 for t in old.values()),
                                   len(old))}
    for label, state_dtype in (("format3_flat", None), ("format3_flat_bfloat16", "bfloat16")):
        record, data = encode_state(state, state_dtype)
        rows[label] = (len(data), record["bits"], len(state))
    out = {"params": report.params, "free": report.free, "num_batches_tracked": len(counters),
           "mask_file_bytes": mask_file}
    for label, (file_bytes, bits, n_tensors) in rows.items():
        header = file_bytes - bits // 8
        out[label] = {"state_tensors": n_tensors, "state_file_bytes": file_bytes, "state_header_bytes": header,
                      "state_bits": bits, "mask_plus_state_file_bytes": mask_file + file_bytes,
                      "header_share_of_files": header / (mask_file + file_bytes),
                      "state_share_of_ticket_bits": bits / (report.mask_bits + bits),
                      "compression_vs_dense_source": (report.params + bits) / (report.mask_bits + bits)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_small_050")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--skip", default="", help="comma-separated: accuracy, sizes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    result = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "timm": timm.__version__,
              "timm_fslt": timm_fslt.__version__, "python": platform.python_version()}
    if "accuracy" not in skip:
        data = digits(args.size)
        runs = []
        for seed in args.seeds:
            runs.append(accuracy_run(args.model, seed, args.epochs, args.lr, data))
            row = runs[-1]
            print(f"seed {seed}: " + ", ".join(f"{d}: {row[str(d)]['accuracy'] * 100:.2f}% "
                                               f"(max |dlogit| {row[str(d)]['max_abs_logit_diff_vs_fp32']:.2e}, "
                                               f"{row[str(d)]['ticket_bytes']:,} B)" for d in STATE_DTYPES)
                  + f"; search {row['search_seconds']} s", flush=True)
        result["accuracy"] = {
            "model": args.model, "kwargs": {"num_classes": 10, "in_chans": 1}, "input": f"{args.size}x{args.size}",
            "data": "sklearn load_digits, 1297 train / 500 test (split seed 0)",
            "freeze": {"prune": 0.35, "lock": 0.35}, "search": f"Adam lr {args.lr} cosine, batch 64, {args.epochs} "
                                                                 "epochs", "seeds": args.seeds,
            "test_images": len(data[3]),
            "summary": {label: _summary(runs, label) for label in [str(d) for d in STATE_DTYPES] + list(ROUNDED_ONLY)},
            "runs": runs}
    if "sizes" not in skip:
        result["sizes"] = {}
        for name in args.families:
            result["sizes"][name] = row = sizes(name)
            print(f"{name}: state {row['format2_per_tensor']['state_file_bytes']:,} B per-tensor -> "
                  f"{row['format3_flat']['state_file_bytes']:,} B flat -> "
                  f"{row['format3_flat_bfloat16']['state_file_bytes']:,} B bf16; compression "
                  f"{row['format2_per_tensor']['compression_vs_dense_source']:.2f}x -> "
                  f"{row['format3_flat']['compression_vs_dense_source']:.2f}x -> "
                  f"{row['format3_flat_bfloat16']['compression_vs_dense_source']:.2f}x", flush=True)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
