"""What the three recipes share: the command line, presets, model building and the run.

Each recipe (``cifar10.py``, ``imagenet.py``, ``ogbn_arxiv.py``) only adds its data
and model; the training itself is ``timm_fslt.training.train``.  Settings come from,
in increasing priority: the defaults below, a preset (``presets/<name>.yaml``),
then the command line.  Everything is checked before data is read or anything
trains, and every error names the option at fault.
"""
from __future__ import annotations

import argparse
import re
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import timm
import yaml
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env, set_seed

from timm_fslt.frozen import BATCHNORM_MODES, BIAS_MODES, FreezeConfig, freeze
from timm_fslt.nn.supermask import SCALES, SCOPES
from timm_fslt.regen.init import SCORE_INITS, WEIGHT_INITS
from timm_fslt.regen.pattern import DISTRIBUTIONS
from timm_fslt.training import (MIXED_PRECISION, OPTIMIZERS, SCHEDULERS, ClassificationTask, RunConfigError,
                                TrainConfig, train)
from timm_fslt.training.config import resolve_grad_accum, resolve_mixed_precision
from timm_fslt.training.data import DataError, resolve_image_data_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_options as M  # noqa: E402

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
# ticket (= edge_popup), the other search methods of freeze(method=...) (search_options.py), or weights.
METHODS = ("ticket", "weights", *M.SEARCH_METHODS)
# Recipe options passed to timm_fslt.freeze (FreezeConfig fields of the same names).
FREEZE_KEYS = ("prune", "lock", "sparsity", "distribution", "scope", "weight_init", "score_init", "scale",
               "batchnorm", "bias", "seed")
# Recipe option -> TrainConfig field, for every field the command line sets; ``train_config``
# adds output_dir, architecture and dataset_ids, and project_name stays the library's.
TRAIN_KEYS = {name: name for name in (
    "epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay", "nesterov",
    "scheduler", "warmup_epochs", "label_smoothing", "mixed_precision", "seed", "num_workers",
    "limit_train_batches", "limit_eval_batches", "resume", "overwrite", "keep_checkpoints",
    "checkpoint_every_steps", "stop_after",
    "log_with", "log_every", "progress", "save_ticket", "push_to_hub", "hub_private", "cpu", "check_finite",
    "check_sync_every", "recompute_weights", "deterministic")}
TRAIN_KEYS["grad_accum"] = "grad_accum_steps"


def _library_defaults() -> dict:
    """The defaults of FreezeConfig and TrainConfig under the recipe's option names."""
    freezing = {f.name: f.default for f in dataclasses.fields(FreezeConfig)}
    training = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {**{k: freezing[k] for k in FREEZE_KEYS}, **{k: training[field] for k, field in TRAIN_KEYS.items()}}


# Defaults under every preset (a preset overrides them, the command line overrides both):
# the library's, then the options only recipes have, then where recipes deliberately differ.
BASE = {
    **_library_defaults(),
    "model": None, "model_kwargs": {}, "method": "ticket", "val_fraction": 0.2,
    "data": None, "hf_token": None, "img_size": None, "data_num_proc": None, "data_root": None, "download": False,
    "sweep": [],
    **{k: v for k, v in M.DEFAULTS.items() if k != "search_method"},
    # Recipes read image files: worker processes keep the GPU fed (the library's 0 suits in-memory data).
    "num_workers": 4,
    # None: runs/<recipe>/<model>-<point>-seed<seed> (default_output_dir), not the library's one folder.
    "output_dir": None,
}
# The choices of the command line are the library's own tuples.
CHOICES = {"method": METHODS, "distribution": DISTRIBUTIONS, "scope": SCOPES, "weight_init": WEIGHT_INITS,
           "score_init": SCORE_INITS, "scale": tuple("none" if c is None else c for c in SCALES),
           "batchnorm": BATCHNORM_MODES, "bias": BIAS_MODES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
           "mixed_precision": MIXED_PRECISION}


class RecipeError(ValueError):
    """Bad recipe input, reported before anything trains."""


def _kwargs_value(text: str):
    return yaml.safe_load(text)


def parse_model_kwargs(items: Sequence[str]) -> dict:
    """``--model-kwargs width=0.25 hidden=16`` or ``--model-kwargs '{"width": 0.25}'``."""
    out: dict = {}
    for item in items or ():
        item = item.strip()
        if item.startswith("{"):
            try:
                value = json.loads(item)
            except json.JSONDecodeError as err:
                raise RecipeError(f"--model-kwargs: {item!r} is not valid JSON ({err})") from None
            if not isinstance(value, dict):
                raise RecipeError(f"--model-kwargs: {item!r} must be a JSON object")
            out.update(value)
        elif "=" in item:
            key, value = item.split("=", 1)
            if not key.isidentifier():
                raise RecipeError(f"--model-kwargs: {key!r} is not a keyword name")
            out[key] = _kwargs_value(value)
        else:
            raise RecipeError(f"--model-kwargs: expected key=value or a JSON object, got {item!r}")
    return out


def _resume_arg(text: str):
    """--resume [latest | auto | fallback | FOLDER]; TrainConfig checks the value (empty, look-alikes)."""
    return True if text == "latest" else text


def build_parser(recipe: str, description: str, *, image: bool) -> argparse.ArgumentParser:
    """The command line every recipe accepts; recipe-specific data options depend on ``image``."""
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(prog=f"recipes/{recipe}.py", description=description,
                                argument_default=S,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", help="preset name in recipes/presets (or a .yaml path); "
                                    "default: the recipe's preset for --model")
    _model_options(p.add_argument_group("model and method"))
    _optimisation_options(p.add_argument_group("optimisation"))
    _data_options(p.add_argument_group("data"), image)
    _run_options(p.add_argument_group("run"))
    return p


def _model_options(g) -> None:
    g.add_argument("--model", help="model name (timm name for the image recipes, 'gin' for ogbn_arxiv)")
    g.add_argument("--model-kwargs", dest="model_kwargs", nargs="+", metavar="KEY=VALUE",
                   help="extra model constructor kwargs, e.g. width=0.25 (or one JSON object)")
    g.add_argument("--method", choices=CHOICES["method"],
                   help="ticket (= edge_popup): Edge-Popup score search in a (partially) frozen random network; "
                        "multicoated / iterand: the other search methods (see --coat-sparsities, --rerand-*); "
                        "weights: ordinary weight training of the same architecture (upper reference)")
    g.add_argument("--prune", type=float, help="fraction of weights pruned for good (P)")
    g.add_argument("--lock", type=float, help="fraction of weights kept for good (L)")
    g.add_argument("--sparsity", type=float, help="ticket sparsity K in [P, 1 - L] (default: middle)")
    g.add_argument("--distribution", choices=CHOICES["distribution"])
    g.add_argument("--scope", choices=CHOICES["scope"])
    g.add_argument("--weight-init", dest="weight_init", choices=CHOICES["weight_init"])
    g.add_argument("--score-init", dest="score_init", choices=CHOICES["score_init"])
    g.add_argument("--scale", choices=CHOICES["scale"])
    g.add_argument("--batchnorm", choices=CHOICES["batchnorm"])
    g.add_argument("--bias", choices=CHOICES["bias"])
    g.add_argument("--seed", type=int, help="seed of weights, freezing, scores, split and data order")
    M.add_options(g)


def _optimisation_options(g) -> None:
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", dest="batch_size", type=int,
                   help="global batch size (all processes and accumulation steps together)")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, help="per-process eval batch")
    g.add_argument("--optimizer", choices=CHOICES["optimizer"])
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--scheduler", choices=CHOICES["scheduler"])
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int)
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float)
    g.add_argument("--grad-accum", dest="grad_accum", type=int,
                   help="gradient accumulation steps (default: accelerate launch's --gradient_accumulation_steps, "
                        "else 1)")
    g.add_argument("--mixed-precision", dest="mixed_precision", choices=CHOICES["mixed_precision"])
    g.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16")
    g.add_argument("--fp16", dest="mixed_precision", action="store_const", const="fp16")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA algorithms, no cuDNN benchmarking, no TF32 (and CUBLAS_WORKSPACE_CONFIG="
                        ":4096:8 if unset): a resumed GPU run is then bit-identical. Slower; an op without a "
                        "deterministic CUDA implementation raises. No effect on the CPU's results")


def _data_options(g, image: bool) -> None:
    if image:
        g.add_argument("--data", help="Hub dataset id, a save_to_disk DatasetDict folder, or an image "
                                      "folder with train/ and test/ (or val/)")
        g.add_argument("--hf-token", dest="hf_token", help="Hub token for gated datasets (default: HF_TOKEN)")
        g.add_argument("--img-size", dest="img_size", type=int,
                       help="input size; the rest of the data config (interpolation, crop_pct, mean, std) is "
                            "timm's resolve_data_config of the model")
        g.add_argument("--data-num-proc", dest="data_num_proc", type=int,
                       help="processes datasets.load_dataset prepares a Hub dataset with (num_proc)")
        g.add_argument("--val-fraction", dest="val_fraction", type=float,
                       help="share of the train split held out for validation (paper: 0.2, i.e. 4:1)")
    else:
        g.add_argument("--data-root", dest="data_root", help="folder that holds (or receives) ogbn_arxiv/")
        g.add_argument("--download", action="store_true", help="let ogb download OGBN-Arxiv if missing")
    g.add_argument("--num-workers", dest="num_workers", type=int)
    g.add_argument("--limit-train-batches", dest="limit_train_batches", type=int,
                   help="train batches per epoch and process (quick runs)")
    g.add_argument("--limit-eval-batches", dest="limit_eval_batches", type=int)


def _run_options(g) -> None:
    g.add_argument("--output-dir", dest="output_dir")
    g.add_argument("--resume", nargs="?", const=True, type=_resume_arg, metavar="auto|fallback|FOLDER",
                   help="continue the run in --output-dir from its newest checkpoint (by recorded epoch and "
                        "step; each file's size and sha256 are verified); 'auto': only if there is one, else "
                        "start fresh; 'fallback': if the newest is damaged, continue from the newest valid "
                        "older one; or a checkpoint folder. A damaged newest checkpoint is an error otherwise")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    g.add_argument("--stop-after", dest="stop_after", type=int,
                   help="stop after this many epochs (time-limited jobs); continue with --resume")
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int)
    g.add_argument("--checkpoint-every-steps", dest="checkpoint_every_steps", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch; --resume continues "
                        "mid-epoch exactly (default: at epoch ends only)")
    g.add_argument("--log-with", dest="log_with", nargs="+",
                   help="extra Accelerate trackers (tensorboard, wandb, ...); metrics.jsonl is always written")
    g.add_argument("--log-every", dest="log_every", type=int)
    g.add_argument("--check-sync-every", dest="check_sync_every", type=int,
                   help="verify every N steps that all processes hold identical masks (default: each epoch)")
    g.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="do not stop at the first non-finite loss")
    g.add_argument("--recompute-weights", dest="recompute_weights", action="store_true",
                   help="rebuild each layer's W * mask in the backward instead of keeping it "
                        "(less memory, same gradients)")
    g.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID", help="upload the ticket to the Hub")
    g.add_argument("--hub-private", dest="hub_private", action="store_true")
    g.add_argument("--no-ticket", dest="save_ticket", action="store_false", help="do not save a ticket")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise RecipeError(f"--preset: no preset {name_or_path!r} (known: {known}, or a path to a .yaml file)")
    with open(path, encoding="utf-8") as f:
        preset = yaml.safe_load(f) or {}
    if not isinstance(preset, dict):
        raise RecipeError(f"--preset: {str(path)!r} must hold a mapping of option: value")
    unknown = sorted(set(preset) - set(BASE))
    if unknown:
        raise RecipeError(f"--preset: {str(path)!r} has unknown keys {unknown}")
    return preset


def resolve_settings(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], *, recipe: str,
                     default_model: str) -> dict:
    """Defaults < preset < command line; returns a plain dict with every option."""
    args = vars(parser.parse_args(argv))
    explicit = set(args)
    model = args.get("model")
    preset_name = args.get("preset")
    if preset_name is None:
        candidate = f"{recipe}_{model or default_model}"
        preset_name = candidate if (PRESETS_DIR / f"{candidate}.yaml").is_file() else f"{recipe}_{default_model}"
    preset = load_preset(preset_name)
    cli_kwargs = parse_model_kwargs(args.pop("model_kwargs", None))
    settings = {**BASE, **preset, **args}
    settings["preset"] = preset_name
    settings["model"] = settings["model"] or default_model
    settings["model_kwargs"] = {**(preset.get("model_kwargs") or {}), **cli_kwargs}
    if settings["scale"] == "none":
        settings["scale"] = None
    settings["_explicit"] = sorted(explicit)
    try:
        M.normalize(settings)
    except M.OptionError as err:
        raise RecipeError(str(err)) from None
    check_settings(settings)
    return settings


def init_processes(s: dict) -> None:
    """Set up the (distributed) process state first, so data preparation can run on the
    main process first; ``train`` later finds the same state (same --cpu, precision)."""
    PartialState(cpu=s["cpu"] or parse_flag_from_env("ACCELERATE_USE_CPU"))


def check_settings(s: dict) -> None:
    """Everything that can be checked without data, so bad input fails in seconds."""
    if s["method"] not in METHODS:
        raise RecipeError(f"--method must be one of {list(METHODS)}, got {s['method']!r}")
    if s["method"] == "weights":
        given = [f"--{k}" for k in ("prune", "lock", "sparsity") if k in s["_explicit"]] + M.given(s)
        if given:
            raise RecipeError(f"{', '.join(given)} only apply to --method ticket (weight training has no masks)")
        if s["push_to_hub"]:
            raise RecipeError("--push-to-hub uploads a ticket; it needs --method ticket")
    else:
        try:
            FreezeConfig(**M.freeze_kwargs(s, FREEZE_KEYS))
        except (TypeError, ValueError) as err:
            raise RecipeError(M.as_options(str(err))) from None
    if not isinstance(s["model_kwargs"], dict):
        raise RecipeError(f"--model-kwargs must be a mapping, got {s['model_kwargs']!r}")
    try:  # --resume '' or 'Fallback', --checkpoint-every-steps 0, a preset's deterministic: 'on' fail here,
        # before any data is read
        TrainConfig(resume=s["resume"], checkpoint_every_steps=s["checkpoint_every_steps"],
                    deterministic=s["deterministic"])
    except ValueError as err:
        raise RecipeError(_as_option(str(err))) from None
    # A bad ACCELERATE_MIXED_PRECISION / ACCELERATE_GRADIENT_ACCUMULATION_STEPS (the launcher's flag or config
    # file), or a flag the launcher's DeepSpeed config overrules, too: a RunConfigError naming both sides.
    resolve_mixed_precision(s["mixed_precision"])
    resolve_grad_accum(s["grad_accum"])


def train_config(s: dict, output_dir: str, *, architecture: Optional[dict] = None,
                 dataset_ids: Sequence[str] = (), data_config: Optional[dict] = None) -> TrainConfig:
    try:
        return TrainConfig(output_dir=output_dir, architecture=architecture if s["method"] == "ticket" else None,
                           dataset_ids=dataset_ids, data_config=data_config,
                           **{field: s[k] for k, field in TRAIN_KEYS.items()})
    except ValueError as err:
        raise RecipeError(_as_option(str(err))) from None


# TrainConfig field -> command-line option, for error messages.
_OPTIONS = {"grad_accum_steps": "--grad-accum", "batch_size": "--batch-size", "eval_batch_size": "--eval-batch-size",
            "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
            "label_smoothing": "--label-smoothing", "mixed_precision": "--mixed-precision",
            "num_workers": "--num-workers", "limit_train_batches": "--limit-train-batches",
            "limit_eval_batches": "--limit-eval-batches", "keep_checkpoints": "--keep-checkpoints",
            "checkpoint_every_steps": "--checkpoint-every-steps",
            "stop_after": "--stop-after", "log_every": "--log-every", "log_with": "--log-with",
            "check_sync_every": "--check-sync-every"}
_OPTION_WORDS = re.compile(r"\b(" + "|".join(sorted(_OPTIONS, key=len, reverse=True)) + r")\b")


def _as_option(message: str) -> str:
    # whole words only, so that "batch_size" inside "eval_batch_size" is left to its own entry
    message = _OPTION_WORDS.sub(lambda m: _OPTIONS[m.group(0)], message)
    head = message.split(" ", 1)[0]
    return message if head.startswith("--") else f"--{message}"


def default_output_dir(recipe: str, s: dict) -> str:
    if s["output_dir"]:
        return s["output_dir"]
    if s["method"] == "weights":
        tag = "weights"
    else:
        k = "mid" if s["sparsity"] is None else f"{s['sparsity']:g}"
        tag = f"p{s['prune']:g}-l{s['lock']:g}-k{k}{M.output_tag(s)}"
    return os.path.join("runs", recipe, f"{s['model']}-{tag}-seed{s['seed']}")


def check_timm_model(name: str) -> None:
    # timm knows conv6 / resnet18_cifar: importing timm_fslt (above) registered them.
    if not isinstance(name, str) or not timm.is_model(name):
        raise RecipeError(f"--model: unknown model {name!r}; give a timm model name "
                          "(e.g. conv6, resnet18_cifar, resnet18; see timm.list_models())")


def build_timm_model(s: dict, num_classes: int, n_train: Optional[int] = None):
    """The recipe's model: frozen for --method ticket, as built for --method weights; ``n_train``
    (the train set's size) gives a sparsity schedule its length (``freeze_if_ticket``)."""
    kwargs = dict(s["model_kwargs"])
    if kwargs.setdefault("num_classes", num_classes) != num_classes:
        raise RecipeError(f"--model-kwargs num_classes={kwargs['num_classes']} but the data has "
                          f"{num_classes} classes")
    set_seed(s["seed"])  # weight training starts from the same initialisation on every process
    try:
        model = timm.create_model(s["model"], **kwargs)
    except TypeError as err:
        raise RecipeError(f"--model-kwargs: {s['model']} rejected {kwargs}: {err}") from None
    architecture = {"timm": s["model"], "kwargs": kwargs}
    return freeze_if_ticket(model, s, n_train), architecture


def freeze_if_ticket(model, s: dict, n_train: Optional[int] = None, batched: bool = True):
    """``freeze`` with the recipe's settings (--method ticket and the search methods).  A sparsity
    schedule without --schedule-steps spans the run: ``s["schedule_steps"]`` is set to epochs x the
    optimizer steps of an epoch on ``n_train`` examples, so results and checkpoints record it."""
    if s["method"] == "ticket":
        if s["sparsity_schedule"] is not None and s["schedule_steps"] is None:
            if n_train is None:
                raise RecipeError("--sparsity-schedule: the train set's size is needed to compute "
                                  "--schedule-steps; give --schedule-steps")
            s["schedule_steps"] = M.schedule_steps(s, n_train, batched)
        try:
            freeze(model, **M.freeze_kwargs(s, FREEZE_KEYS))
        except (TypeError, ValueError) as err:
            raise RecipeError(M.as_options(str(err))) from None
    return model


def image_recipe(recipe: str, doc: str, *, default_model: str, load: Callable, default_data: str, img_size: int,
                 env_token: bool = False) -> tuple[Callable, Callable]:
    """``parser()`` and ``main(argv=None)`` of an image recipe (cifar10.py, imagenet.py): settings,
    data (``load``, e.g. ``load_cifar10``), model, run.  The parser's description is the first
    line of ``doc``; ``env_token``: without --hf-token, HF_TOKEN goes to ``load`` (gated data)."""
    def parser() -> argparse.ArgumentParser:
        return build_parser(recipe, doc.split("\n")[0], image=True)

    def main(argv: Optional[Sequence[str]] = None) -> dict:
        s = resolve_settings(parser(), argv, recipe=recipe, default_model=default_model)
        check_timm_model(s["model"])
        init_processes(s)
        token = s["hf_token"] or (os.environ.get("HF_TOKEN") if env_token else None)
        size = s["img_size"] or img_size
        data = load(s["data"] or default_data, img_size=size, seed=s["seed"], val_fraction=s["val_fraction"],
                    token=token, num_proc=s["data_num_proc"])
        model, architecture = build_timm_model(s, data.num_classes, len(data.train))
        # The transforms follow the model's timm data config (interpolation, crop_pct, mean, std), at --img-size.
        data.use_data_config(resolve_image_data_config(data.kind, model, img_size=size))
        hub_ids = [data.source] if not os.path.exists(os.path.expanduser(data.source)) else []
        return run(recipe, s, model, data, task=ClassificationTask(s["label_smoothing"]), architecture=architecture,
                   dataset_ids=hub_ids, extra_info={"img_size": size}, data_config=data.data_config)

    return parser, main


def run(recipe: str, s: dict, model, data, *, task=None, architecture: Optional[dict] = None,
        dataset_ids: Sequence[str] = (), extra_info: Optional[dict] = None,
        data_config: Optional[dict] = None) -> dict:
    """Train (timm_fslt.training.train) and print a one-screen summary; ``data_config`` (timm's,
    of the eval transform) is recorded in the ticket."""
    output_dir = default_output_dir(recipe, s)
    config = train_config(s, output_dir, architecture=architecture, dataset_ids=dataset_ids,
                          data_config=data_config)
    info = {"recipe": recipe, "preset": s["preset"], "model": s["model"], "model_kwargs": s["model_kwargs"],
            "method": s["method"], "data": data.fingerprint(), **(extra_info or {})}
    if s["method"] == "ticket":
        info["freeze"] = M.recorded(s, FREEZE_KEYS, model)
    if recipe != "ogbn_arxiv":
        info["val_fraction"] = s["val_fraction"]
    results = train(model, data.train, data.val, data.test, config, task=task, run_info=info)
    if results.get("completed"):
        _print_summary(results)
    return results


def _print_summary(results: dict) -> None:
    if not PartialState().is_main_process:
        return
    totals = results["size_report"]["totals"]
    acc = results["accuracy"]
    print(f"\nbest val acc {acc['val']:.4f} (epoch {results['best_epoch']}), test acc "
          f"{acc['test'] if acc['test'] is None else format(acc['test'], '.4f')}, sparsity "
          f"{results['sparsity']:.4f}")
    if "ticket_bits" in totals:
        print(f"ticket {totals['ticket_bits']:,} bits ({totals['compression_vs_dense_source']:.2f}x smaller "
              f"than a dense-source ticket) -> {results.get('ticket_dir', '(not saved)')}")
    else:
        print(f"model {totals['model_bits']:,} bits -> {results.get('model_file')}")
    print(f"results -> {os.path.join(results['output_dir'], 'results.json')}")


def main_guard(fn: Callable[[], Any]) -> None:
    """Run a recipe's main; bad input exits with the message, not a traceback."""
    try:
        fn()
    except (RecipeError, DataError, RunConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
