"""Peak memory of ``timm_fslt.load_ticket`` per parameter element (the basis of ``max_params``).

For each model: save a frozen (0.35/0.35) ticket in one subprocess, then load it in a fresh
subprocess and report the growth of the peak resident set (``ru_maxrss``) over the peak
after the imports, divided by the parameter and buffer elements of the plain architecture
(what ``load_ticket``'s ``max_params`` counts).

    python benchmarks/load_memory.py                      # resnet50, resnet18_cifar
    python benchmarks/load_memory.py --models resnet50 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

_SAVE = """
import sys, torch, timm_fslt
torch.manual_seed(0)
model = timm_fslt.create_model(sys.argv[1])
timm_fslt.freeze(model, prune=0.35, lock=0.35)
timm_fslt.save_ticket(model, sys.argv[2])
"""

_LOAD = """
import json, resource, sys, time, timm_fslt
from timm_fslt.ticket.architecture import build_for_check, count_elements
from timm_fslt.ticket import read_config
elements = count_elements(build_for_check(read_config(sys.argv[1])["architecture"]))  # on the meta device
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model = timm_fslt.load_ticket(sys.argv[1])
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"elements": elements, "peak_growth_bytes": (after - before) * 1024,
                  "seconds": seconds}))
"""


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(model: str) -> dict:
    env = dict(os.environ, OUTDATED_IGNORE="1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ticket")
        subprocess.run([sys.executable, "-c", _SAVE, model, path], check=True, env=env)
        run = subprocess.run([sys.executable, "-c", _LOAD, path], check=True, env=env, capture_output=True, text=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["bytes_per_element"] = result["peak_growth_bytes"] / result["elements"]
    return {"model": model, **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnet18_cifar")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    rows = [measure(m) for m in args.models.split(",")]
    print(f"cpu: {_cpu()}")
    for r in rows:
        print(f"{r['model']}: {r['elements']:,} elements, peak +{r['peak_growth_bytes'] / 2**20:,.0f} MiB "
              f"= {r['bytes_per_element']:.1f} bytes/element, {r['seconds']:.2f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": _cpu(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
