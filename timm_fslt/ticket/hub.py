"""Share tickets on the Hugging Face Hub: ``push_to_hub`` and repo ids in ``load_ticket``.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo``,
``HfApi.upload_folder``, ``snapshot_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HOME`` and ``HF_HUB_OFFLINE`` work as everywhere else in the ecosystem.
A pushed repo holds the ticket's three files unchanged plus a model card
(README.md) generated from config.json.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from torch import nn

from timm_fslt.errors import TicketChecksumError, TicketError
from timm_fslt.ticket.io import (CARD_NAME, TICKET_FILES, _check_datasets, _check_metrics,
                                 describe_architecture, read_ticket, save_ticket, size_report_from_config)

PathLike = Union[str, os.PathLike]
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")
PAPER = ("Otsuka et al., \"Partially Frozen Random Networks Contain Compact Strong Lottery Tickets\", "
         "TMLR 2025 (arXiv:2402.14029)")


HUB_PREFIX = "hf-hub:"  # as in timm.create_model("hf-hub:user/name"): always the Hub, never a path


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID_RE.match(source)) and ".." not in source


@dataclasses.dataclass(frozen=True)
class TicketSource:
    """Where a ticket's files are: ``directory``; for a Hub snapshot, the ``repo_id`` and the
    cache folder (``root``) its files may link into."""
    directory: Path
    repo_id: Optional[str] = None
    root: Optional[Path] = None


def _looks_local(source: str) -> Optional[str]:
    """Why ``source``, spelled like a repo id, must be a local path (None when it may be a repo id)."""
    parent = Path(source).parent
    if str(parent) not in ("", ".") and parent.is_dir():
        return f"its parent folder {str(parent)!r} exists here"
    return None


def resolve_ticket_source(source: PathLike, *, revision: Optional[str] = None,
                          token: Union[str, bool, None] = None, cache_dir: Optional[PathLike] = None,
                          force_download: bool = False) -> TicketSource:
    """A local ticket directory, or the snapshot folder of a Hub repo id (downloaded or cached)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TicketError(f"source must be a ticket directory or a Hub repo id 'user/name', got "
                          f"{type(source).__name__}")
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    repo_id = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else None
    if repo_id is None:
        path = Path(text).expanduser()
        if path.is_dir():
            return TicketSource(path)
        if path.exists():
            raise TicketError(f"{text!r} is a file; a ticket is a directory (or a Hub repo id 'user/name')")
        if not is_repo_id(text):
            raise TicketError(f"no ticket directory at {text!r}, and it is not a Hub repo id ('user/name')")
        why = _looks_local(text)
        if why is not None:
            raise TicketError(f"no ticket directory at {text!r} ({why}, so it is read as a local path; for a "
                              f"Hub repo write {HUB_PREFIX + text!r})")
        repo_id = text
    elif not is_repo_id(repo_id) or "/" not in repo_id:
        raise TicketError(f"{text!r}: after {HUB_PREFIX!r} comes a Hub repo id 'user/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=list(TICKET_FILES) + [CARD_NAME],
                                   force_download=force_download)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise TicketError(f"no local directory {text!r}, and the Hub repo {repo_id!r} could not be "
                          f"fetched (nor found in the local Hub cache): {err}") from err
    folder = Path(folder)
    # <cache>/models--user--name/snapshots/<commit>/: its files link into ../../blobs
    return TicketSource(folder, repo_id, folder.parent.parent)


def redownload(found: TicketSource, **kwargs) -> TicketSource:
    """Fetch a Hub ticket again after its cached copy failed a checksum (a download cut short)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise TicketChecksumError(
            f"the cached copy of the Hub ticket {found.repo_id!r} in {str(found.directory)!r} is damaged and "
            "HF_HUB_OFFLINE is set: unset it to download the ticket again, or delete that folder")
    return resolve_ticket_source(HUB_PREFIX + found.repo_id, force_download=True, **kwargs)


def resolve_ticket(source: PathLike, **kwargs) -> Path:
    """The directory holding the ticket ``source`` names (see ``resolve_ticket_source``)."""
    return resolve_ticket_source(source, **kwargs).directory


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

    metrics = {**config.get("metrics", {}), **_check_metrics(metrics)}
    datasets = _check_datasets(datasets) or list(config.get("datasets", []))
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
    lines = [
        f"# {name}",
        "",
        f"A strong lottery ticket found inside a partially frozen random "
        f"`{describe_architecture(arch)}` with `timm_fslt` ({PAPER}).",
        "",
        "No weight here was trained. The random weights and the freezing pattern (which weights are "
        "pruned or locked for good) are regenerated from the seed; the ticket stores one bit per free "
        "(searched) weight, plus the state no seed can rebuild.",
        "",
        "## Load it",
        "",
        "```python",
        "import timm_fslt",
        f"model = timm_fslt.load_ticket(\"{repo_id}\")  # eval mode; materialize=True gives a plain model",
        "```",
        "",
    ]
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
    lines += [
        f"| random generator version | {config['generator_version']} |",
        "",
        "## Size",
        "",
        "| | bits |",
        "|---|---|",
        f"| supermask (1 bit per free weight) | {t.mask_bits:,} |",
        f"| non-regenerable state ({len(t.state_tensors)} tensors) | {t.state_bits:,} |",
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
    lines += [
        f"| total | | {t.params} | {t.pruned} | {t.locked} | {t.free} | {t.kept} | {t.sparsity:.4f} |",
        "",
        "## Files",
        "",
        "- `config.json`: architecture, every `freeze` argument and seed, per-layer counts, checksums.",
        f"- `supermask.safetensors`: {t.mask_bits:,} bits packed in one uint8 tensor; {config['mask']['order']}.",
        "- `state.safetensors`: the non-regenerable state (e.g. BatchNorm running statistics).",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


# -- push -----------------------------------------------------------------------------------

def push_to_hub(model_or_ticket_dir: Union[nn.Module, PathLike], repo_id: str, *, private: bool = False,
                token: Union[str, bool, None] = None, commit_message: Optional[str] = None,
                metrics: Optional[Mapping] = None, datasets: Union[None, str, Sequence[str]] = None,
                architecture: Optional[Mapping] = None):
    """Upload a ticket (a frozen model, or a saved ticket directory) to a Hub model repo.

    Creates the repo if needed (``private``), uploads config.json,
    supermask.safetensors and state.safetensors unchanged and a generated model
    card (README.md: metadata, accuracy if known, size report, freezing ratios,
    seeds, and the code to load it). Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or "/" not in repo_id or not is_repo_id(repo_id):
        raise TicketError(f"repo_id must be a Hub repo id 'user/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="fslt-push-") as tmp:
        staging = Path(tmp) / "ticket"
        if isinstance(model_or_ticket_dir, nn.Module):
            save_ticket(model_or_ticket_dir, staging, architecture=architecture, metrics=metrics,
                        datasets=datasets)
        else:
            source = Path(model_or_ticket_dir).expanduser()
            if not source.is_dir():
                raise TicketError(f"model_or_ticket_dir must be a frozen model or a ticket directory, "
                                  f"got {str(model_or_ticket_dir)!r}")
            read_ticket(source)  # verifies every checksum before anything is uploaded
            staging.mkdir()
            for name in TICKET_FILES:
                shutil.copyfile(source / name, staging / name)
        config, _, _ = read_ticket(staging)
        card = model_card(config, repo_id, metrics=metrics, datasets=datasets)
        (staging / CARD_NAME).write_text(str(card), encoding="utf-8")

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                                 commit_message=commit_message or "Upload timm_fslt ticket")
