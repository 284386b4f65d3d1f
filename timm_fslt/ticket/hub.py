"""Share tickets on the Hugging Face Hub: ``push_to_hub`` and repo ids in ``load_ticket``.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo``,
``HfApi.upload_folder``, ``snapshot_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HOME`` and ``HF_HUB_OFFLINE`` work as everywhere else in the ecosystem.
A pushed repo holds the ticket's three files unchanged plus a model card
(README.md) generated from config.json.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from torch import nn

from timm_fslt.errors import TicketError
from timm_fslt.ticket.architecture import describe_architecture
from timm_fslt.ticket.format import (CARD_NAME, CONFIG_NAME, MASK_NAME, STATE_NAME, TIMM_WEIGHTS_NAME, check_bool,
                                     check_datasets, check_listed_file, check_metrics, read_ticket,
                                     size_report_from_config)
from timm_fslt.ticket.mask_coding import check_mask_coding, coding_of
from timm_fslt.ticket.timm_config import check_data_config
from timm_fslt.ticket.io import save_ticket
from timm_fslt.ticket.sources import is_repo_id

PathLike = Union[str, os.PathLike]
PAPER = ("Otsuka et al., \"Partially Frozen Random Networks Contain Compact Strong Lottery Tickets\", "
         "TMLR 2025 (arXiv:2402.14029)")


# -- model card ---------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def model_card(config: Mapping, repo_id: str, *, metrics: Optional[Mapping] = None,
               datasets: Union[None, str, Sequence[str]] = None):
    """A ``huggingface_hub.ModelCard`` for a ticket, generated from its config.json.

    ``metrics``/``datasets`` add to (override) the ones stored in config.json.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = {**config.get("metrics", {}), **check_metrics(metrics)}
    datasets = check_datasets(datasets) or list(config.get("datasets", []))
    arch = config["architecture"]
    freeze = config["freeze"]
    report = size_report_from_config(config)
    is_timm = "timm" in arch
    name = repo_id.split("/")[-1]
    task = "image-classification" if is_timm else "other"

    eval_results = None
    if metrics and datasets:
        eval_results = [EvalResult(task_type=task, dataset_type=datasets[0], dataset_name=datasets[0],
                                   metric_type=key, metric_value=value) for key, value in metrics.items()]
    tags = ["strong-lottery-ticket", "pruning", "supermask", "timm_fslt"]
    tags += ["timm", "image-classification"] if is_timm else ["pytorch"]
    data = ModelCardData(library_name="timm_fslt", license="apache-2.0", tags=tags,
                         datasets=datasets or None, metrics=sorted(metrics) or None,
                         pipeline_tag=task if is_timm else None, model_name=name,
                         eval_results=eval_results)

    t = report
    intro = (f"A strong lottery ticket found inside a partially frozen random `{describe_architecture(arch)}` with "
             f"`timm_fslt` ({PAPER}).\n\nNo weight here was trained. The random weights and the freezing pattern "
             "(which weights are pruned or locked for good) are regenerated from the seed; the ticket stores one "
             + ("bit per free (searched) weight" if t.method is None else
                f"symbol per free (searched) weight, found by the search method `{t.method}` "
                f"({config['mask'].get('symbol', '')})")
             + ", plus the state no seed can rebuild.")
    lines = []
    if metrics:
        lines += ["## Results", "", "| metric | value |" + (" dataset |" if datasets else ""),
                  "|---|---|" + ("---|" if datasets else "")]
        for key, value in metrics.items():
            lines.append(f"| {key} | {_fmt(value)} |" + (f" {datasets[0]} |" if datasets else ""))
        lines.append("")
    lines += [
        "## Freezing",
        "",
        "| setting | value |",
        "|---|---|",
        f"| prune ratio | {_fmt(freeze['prune'])} |",
        f"| lock ratio | {_fmt(freeze['lock'])} |",
        f"| freezing ratio (measured) | {t.freezing_ratio:.4f} |",
        f"| ticket sparsity (measured) | {t.sparsity:.4f} |",
    ]
    for key in ("sparsity", "distribution", "scope", "weight_init", "score_init", "scale", "seed",
                "batchnorm", "bias", "include", "exclude"):
        lines.append(f"| {key} | {_fmt(freeze.get(key))} |")
    for key in ("method", "coat_sparsities", "rerand_period", "rerand_rate", "sparsity_schedule", "schedule_steps"):
        if key in freeze:  # (a search method's ticket: format 6)
            lines.append(f"| {key} | {_fmt(freeze[key])} |")
    if t.method is not None:
        lines.append(f"| search steps (saved at) | {config['mask'].get('search_step')} |")
    lines += [
        f"| random generator version | {config['generator_version']} |",
        "",
        "## Size",
        "",
        "| | bits |",
        "|---|---|",
        (f"| supermask (1 bit per free weight) | {t.mask_bits:,} |" if t.method is None else
         f"| supermask symbols ({t.symbol_bits} bits per free weight, {t.mask_alphabet} symbols, {t.method}) "
         f"| {t.mask_bits:,} |"),
        f"| supermask as stored ({t.mask_coding}; empirical entropy {t.mask_entropy_bits:,.0f}) "
        f"| {t.mask_stored_bits:,} |",
        f"| non-regenerable state ({len(t.state_tensors)} tensors"
        f"{', floats as ' + config['state']['state_dtype'] if config['state'].get('state_dtype') else ''}) "
        f"| {t.state_bits:,} |",
        f"| **ticket** | **{t.ticket_bits:,}** ({(t.ticket_bits + 7) // 8:,} bytes) |",
        f"| same ticket in a dense random source | {t.dense_source_ticket_bits:,} "
        f"({t.compression_vs_dense_source:.2f}x larger) |",
        f"| dense fp32 weights | {t.fp32_dense_bits:,} ({t.compression_vs_fp32:.1f}x larger) |",
        "",
        "| layer | shape | params | pruned | locked | free | kept | sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in t.layers:
        lines.append(f"| {row.name} | {tuple(row.shape)} | {row.numel} | {row.pruned} | {row.locked} | "
                     f"{row.free} | {row.kept} | {row.sparsity:.4f} |")
    files = config.get("files", {})
    weights = files.get(TIMM_WEIGHTS_NAME)
    lines += [
        f"| total | | {t.params} | {t.pruned} | {t.locked} | {t.free} | {t.kept} | {t.sparsity:.4f} |",
        "",
        "## Files",
        "",
        "- `config.json`: " + ("timm's Hub keys (`architecture`, `num_classes`, `model_args`, `pretrained_cfg` "
                               "with the data config) and, under `timm_fslt`, " if config.get("timm_config") else "")
        + "the architecture record, every `freeze` argument and seed, per-layer counts, checksums.",
        f"- `supermask.safetensors`: {t.mask_bits:,} bits, {t.mask_coding}"
        + (f"-coded in {t.mask_stored_bits:,} bits" if t.mask_coding == "entropy" else " packed")
        + f" in one uint8 tensor; {config['mask']['order']}.",
        "- `state.safetensors`: the non-regenerable state (e.g. BatchNorm running statistics)"
        + ("; one flat tensor per stored dtype, keys, shapes and dtypes in config.json's `state` record."
           if config.get("format_version", 1) >= 3 else "."),
    ]
    if weights:
        lines.append(f"- `{TIMM_WEIGHTS_NAME}`: timm's standard weights file, the state dict of "
                     "`timm_fslt.materialize(model)` (effective weights W * mask * scale, norms, buffers), for "
                     "plain timm; timm_fslt never reads it.")
    lines.append("")
    card = ModelCard.from_template(data, template_str=_CARD_TEMPLATE, model_name=name, intro=intro,
                                   repo_id=repo_id, timm_section=_timm_section(config, repo_id),
                                   details="\n".join(lines))
    return card


def _timm_section(config: Mapping, repo_id: str) -> str:
    """How plain timm reads this repo (format-4 timm tickets), with what timm's weights cost."""
    keys = config.get("timm_config")
    arch = config["architecture"]
    if not keys or "timm" not in arch:
        return ""
    files = config.get("files", {})
    ticket_bytes = sum(files.get(n, {}).get("bytes", 0) for n in (MASK_NAME, STATE_NAME))
    weights = files.get(TIMM_WEIGHTS_NAME)
    own_model = _registered_by_us(arch["timm"])
    text = ["## Load it with timm", "",
            "`config.json` follows timm's Hub schema, so plain timm builds this architecture"
            + (" (it is registered by timm_fslt: `import timm_fslt.models` first)" if own_model else "") + ":", "",
            "```python", "import timm"]
    if weights:
        text += [f"model = timm.create_model(\"hf-hub:{repo_id}\", pretrained=True).eval()",
                 "model.requires_grad_(False)  # as the ticket's weights: some CPU kernels depend on it", "```", "",
                 f"`pretrained=True` loads `{TIMM_WEIGHTS_NAME}`, the materialized ticket: outputs identical to "
                 "`timm_fslt.load_ticket` in eval mode (with parameters that require grad, a few attention models "
                 f"pick other CPU kernels and differ by about 1e-6). It costs {weights['bytes']:,} bytes, "
                 f"{weights['bytes'] / max(ticket_bytes, 1):.0f}x the ticket's {ticket_bytes:,} bytes of mask and "
                 "state; `timm_fslt.load_ticket` never downloads it (it rebuilds the weights from the seed)."]
    else:
        text += [f"model = timm.create_model(\"hf-hub:{repo_id}\")  # the architecture, untrained", "```", "",
                 f"This repo holds no `{TIMM_WEIGHTS_NAME}` (pushed without `timm_weights=True`): plain timm "
                 "builds the random architecture only; the ticket's network comes from `timm_fslt.load_ticket`."]
    return "\n".join(text) + "\n"


def _registered_by_us(name: str) -> bool:
    """A timm model name timm_fslt registers (plain timm knows it after ``import timm_fslt.models``)."""
    import timm.models

    try:
        return timm.models.model_entrypoint(name).__module__.startswith("timm_fslt")
    except (RuntimeError, KeyError, AttributeError):
        return False

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ intro }}

## Load it

```python
import timm_fslt
model = timm_fslt.load_ticket("{{ repo_id }}")  # eval mode; materialize=True gives a plain model
```

{{ timm_section }}
{{ details }}"""


def _resave_with_timm_weights(source: Path, saved: Mapping, staging: Path) -> None:
    from timm_fslt.errors import TicketMismatchError
    from timm_fslt.ticket.io import load_ticket

    model = load_ticket(source)
    save_ticket(model, staging, architecture=saved["architecture"], metrics=saved["metrics"],
                datasets=saved["datasets"], state_dtype=saved["state"].get("state_dtype"),
                data_config=saved.get("data_config"), timm_weights=True, mask_coding=coding_of(saved["mask"]))
    now, _, _ = read_ticket(staging)
    same = [MASK_NAME] + ([STATE_NAME] if saved["format_version"] >= 3 else [])  # formats 1-2 stored state per key
    for name in same:
        if now["files"][name]["sha256"] != saved["files"][name]["sha256"]:
            raise TicketMismatchError(f"timm_weights=True: the ticket rebuilt from {str(source)!r} saves another "
                                      f"{name} than the one saved there; nothing was uploaded")


# -- push -----------------------------------------------------------------------------------


def push_to_hub(model_or_ticket_dir: Union[nn.Module, PathLike], repo_id: str, *, private: bool = False,
                token: Union[str, bool, None] = None, commit_message: Optional[str] = None,
                metrics: Optional[Mapping] = None, datasets: Union[None, str, Sequence[str]] = None,
                architecture: Optional[Mapping] = None, state_dtype: Optional[str] = None,
                data_config: Optional[Mapping] = None, timm_weights: bool = False,
                mask_coding: Optional[str] = None):
    """Upload a ticket (a frozen model, or a saved ticket directory) to a Hub model repo.

    Creates the repo if needed (``private``), uploads config.json,
    supermask.safetensors and state.safetensors unchanged and a generated model
    card (README.md: metadata, accuracy if known, size report, freezing ratios,
    seeds, and the code to load it, with timm_fslt and with plain timm). Returns
    huggingface_hub's ``CommitInfo``.
    ``state_dtype``, ``data_config``, ``mask_coding``: as in ``save_ticket`` (a frozen model only,
    ``mask_coding`` "auto" by default; a saved ticket is pushed as saved).
    ``timm_weights``: also upload timm's ``model.safetensors`` (as in ``save_ticket``), so that plain
    timm loads ``"hf-hub:<repo_id>"`` with ``pretrained=True``. A saved ticket that lacks it is
    rebuilt (``load_ticket``, which refuses import-path builders) and saved again with it into the
    upload only; its supermask must come out byte-identical, or nothing is uploaded. A saved ticket
    with a ``model.safetensors`` is uploaded with it whatever ``timm_weights`` says, after its sha256
    is checked.
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or "/" not in repo_id or not is_repo_id(repo_id):
        raise TicketError(f"repo_id must be a Hub repo id 'user/name', got {repo_id!r}")
    data_config = check_data_config(data_config)
    check_bool(timm_weights, "timm_weights")
    if mask_coding is not None:
        check_mask_coding(mask_coding)
    with tempfile.TemporaryDirectory(prefix="fslt-push-") as tmp:
        staging = Path(tmp) / "ticket"
        if isinstance(model_or_ticket_dir, nn.Module):
            save_ticket(model_or_ticket_dir, staging, architecture=architecture, metrics=metrics,
                        datasets=datasets, state_dtype=state_dtype, data_config=data_config,
                        timm_weights=timm_weights, mask_coding=mask_coding or "auto")
        else:
            if state_dtype is not None:
                raise TicketError(f"state_dtype={state_dtype!r} applies when a frozen model is pushed; a saved "
                                  "ticket directory is pushed as saved: save it with save_ticket(model, "
                                  "directory, state_dtype=...) first")
            if mask_coding is not None:
                raise TicketError(f"mask_coding={mask_coding!r} applies when a frozen model is pushed; a saved "
                                  "ticket directory is pushed as saved: save it with save_ticket(model, "
                                  "directory, mask_coding=...) first")
            if data_config is not None:
                raise TicketError("data_config applies when a frozen model is pushed; a saved ticket directory "
                                  "is pushed as saved: save it with save_ticket(model, directory, data_config=...) "
                                  "first")
            source = Path(model_or_ticket_dir).expanduser()
            if not source.is_dir():
                raise TicketError(f"model_or_ticket_dir must be a frozen model or a ticket directory, "
                                  f"got {str(model_or_ticket_dir)!r}")
            saved, _, _ = read_ticket(source)  # verifies every checksum before anything is uploaded
            if timm_weights and TIMM_WEIGHTS_NAME not in saved["files"]:
                _resave_with_timm_weights(source, saved, staging)
            else:
                staging.mkdir()
                for name in [CONFIG_NAME, *saved["files"]]:
                    if name == TIMM_WEIGHTS_NAME:
                        check_listed_file(source / name, saved["files"][name])
                    shutil.copyfile(source / name, staging / name)
        config, _, _ = read_ticket(staging)
        card = model_card(config, repo_id, metrics=metrics, datasets=datasets)
        (staging / CARD_NAME).write_text(str(card), encoding="utf-8")

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                                 commit_message=commit_message or "Upload timm_fslt ticket")
