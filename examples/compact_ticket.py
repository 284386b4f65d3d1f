"""Compact a sparse ticket and regenerate the compacted ticket from its seed.

    python examples/compact_ticket.py [--quick]

A Conv6 (width 1/4) frozen with 90% of its weights pruned is searched for a few
steps on random data (a stand-in for recipes/cifar10.py), then
``timm_fslt.compact`` removes the channels that carry nothing.  The compacted
model is rebuilt from the FreezeConfig plus ``fslt_structure`` alone, which is
what a ticket stores.
"""
import argparse
import json

import timm
import torch
import torch.nn.functional as F

import timm_fslt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch and fewer search steps")
    args = parser.parse_args()
    batch, steps = (16, 2) if args.quick else (64, 5)

    torch.manual_seed(0)
    model = timm_fslt.freeze(timm.create_model("conv6", width=0.25), prune=0.9, lock=0.02, sparsity=0.95)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    compacted, report = timm_fslt.compact(model, x[:2])
    print(f"channels removed  {report['channels_removed']} "
          f"({report['unread_channels']} unread, {report['zero_channels']} zero) in {report['rounds']} rounds")
    print(f"MACs              {report['macs_before']:,} -> {report['macs_after']:,}")
    print(f"parameters        {report['params_before']:,} -> {report['params_after']:,}")
    print(f"masked weights    {report['weights_before']:,} -> {report['weights_after']:,} "
          f"(kept {report['kept_before']:,} -> {report['kept_after']:,})")
    print(f"mask bits         {timm_fslt.size_report(model).mask_bits:,} -> "
          f"{timm_fslt.size_report(compacted).mask_bits:,}")
    for name, removed in report["removed"].items():
        print(f"  {name:<20} {removed}")

    # Regenerate: a new model frozen from the config, cut as recorded, then given the scores.
    fresh = timm_fslt.freeze(timm.create_model("conv6", width=0.25), config=timm_fslt.get_config(compacted))
    timm_fslt.restore_structure(fresh, json.loads(json.dumps(compacted.fslt_structure)))
    fresh.load_state_dict(compacted.state_dict())
    model.eval(), compacted.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.equal(fresh(x), compacted(x))
        diff = (compacted(x) - model(x)).abs().max().item()
    print(f"regenerated == compacted: {same}; |compacted - original| <= {diff:.1e}")


if __name__ == "__main__":
    main()
