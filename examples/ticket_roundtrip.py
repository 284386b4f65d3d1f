"""Save a ticket, load it back bit-exactly, and (optionally) share it on the Hugging Face Hub.

    python examples/ticket_roundtrip.py                       # search, save, load, compare
    python examples/ticket_roundtrip.py --push-to you/digits-ticket   # also push and reload from the Hub
    FSLT_PUSH_REPO=you/digits-ticket python examples/ticket_roundtrip.py
    python examples/ticket_roundtrip.py --quick               # a few batches (smoke test)

A ticket stores one bit per free weight plus the state no seed can rebuild; the
random weights and the freezing pattern come back from the seed.  Pushing needs a
Hub token (``huggingface-cli login`` or ``HF_TOKEN``); ``HF_ENDPOINT`` points at
another Hub-compatible server.
"""
import argparse
import os
from pathlib import Path

import torch

import timm_fslt
from timm_fslt.apps.demo import digit_sets
from timm_fslt.training import TrainConfig, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ticket_roundtrip")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--push-to", default=os.environ.get("FSLT_PUSH_REPO"),
                   help="Hub repo id 'user/name' to push to (default: $FSLT_PUSH_REPO; unset = no push)")
    p.add_argument("--quick", action="store_true", help="1 epoch of 4 batches")
    args = p.parse_args(argv)
    out = Path(args.out)

    # A small searched ticket: the demo's digit network, 70% frozen.
    model = timm_fslt.create_model("mnist_mlp", num_classes=10, in_chans=1)
    timm_fslt.freeze(model, prune=0.35, lock=0.35, seed=7, scale="static")
    sets = digit_sets(seed=0)
    config = TrainConfig(output_dir=str(out / "search"), epochs=1 if args.quick else args.epochs,
                         lr=0.1, overwrite=True, save_ticket=False, progress=False,
                         limit_train_batches=4 if args.quick else None)
    results = train(model, sets["train"], sets["val"], sets["test"], config)
    accuracy = results["accuracy"]["test"]

    # Save: config.json + supermask.safetensors (1 bit per free weight) + state.safetensors.
    ticket_dir = timm_fslt.save_ticket(model, out / "ticket", overwrite=True, metrics={"accuracy": accuracy})
    for f in sorted(ticket_dir.iterdir()):
        print(f"  {f.name:<24} {f.stat().st_size:>8,} bytes")
    fp32_bytes = 4 * timm_fslt.size_report(model).params
    print(f"  (the same network as fp32 weights: {fp32_bytes:,} bytes)")

    # Load: rebuilds the architecture, regenerates weights and freezing from the seed,
    # applies the stored mask bits.  The outputs are bit-identical.
    x = sets["test"].tensors[0][:512]
    model.eval()
    with torch.no_grad():
        expected = model(x)
        reloaded = timm_fslt.load_ticket(ticket_dir)
        same = torch.equal(reloaded(x), expected)
        # materialize=True gives a plain torch model (weights W * mask * scale), no timm_fslt needed to run it.
        plain = timm_fslt.load_ticket(ticket_dir, materialize=True)
        close = torch.allclose(plain(x), expected, atol=1e-5)
    print(f"reloaded ticket: outputs identical = {same}; materialized plain model: outputs match = {close}")
    if not (same and close):
        return 1

    # Share: push_to_hub(ticket_dir_or_model, "user/name") uploads the three files and a model card;
    # load_ticket("user/name") fetches it anywhere.
    if not args.push_to:
        print("not pushed (pass --push-to user/name or set FSLT_PUSH_REPO to share it on the Hub)")
        return 0
    info = timm_fslt.push_to_hub(ticket_dir, args.push_to, metrics={"accuracy": accuracy})
    print(f"pushed to {args.push_to}: {getattr(info, 'commit_url', info)}")
    with torch.no_grad():
        from_hub = timm_fslt.load_ticket(args.push_to)
        same_hub = torch.equal(from_hub(x), expected)
    print(f"ticket loaded back from the Hub: outputs identical = {same_hub}")
    return 0 if same_hub else 1


if __name__ == "__main__":
    raise SystemExit(main())
