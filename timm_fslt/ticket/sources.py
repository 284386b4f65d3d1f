"""Where a ticket is: a local directory, or a Hub repo id resolved through ``huggingface_hub``.

``"user/name"`` is a repo id unless a folder of that spelling's parent exists here (then it is
a local path, so a typo is never sent to the Hub); ``"hf-hub:user/name"`` always means the Hub,
as in ``timm.create_model``. A Hub snapshot's files are symlinks into the repo's own blob
store, so the loader accepts links that stay inside ``TicketSource.root``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

from timm_fslt.errors import TicketChecksumError, TicketError
from timm_fslt.ticket.format import CARD_NAME, TICKET_FILES

PathLike = Union[str, os.PathLike]


HUB_PREFIX = "hf-hub:"  # as in timm.create_model("hf-hub:user/name"): always the Hub, never a path
LOCAL_PREFIX = "local-dir:"  # as in timm.create_model("local-dir:/path"): always a local directory


def is_repo_id(source: str) -> bool:
    """Whether ``source`` is spelled as a Hub repo id (``huggingface_hub.utils.validate_repo_id``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TicketSource:
    """Where a ticket's files are: ``directory``; for a Hub snapshot, the ``repo_id`` and the
    cache folder (``root``) its files may link into."""
    directory: Path
    repo_id: Optional[str] = None
    root: Optional[Path] = None
    revision: Optional[str] = None


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
    if text.startswith(LOCAL_PREFIX):
        path = Path(text[len(LOCAL_PREFIX):]).expanduser()
        if not text[len(LOCAL_PREFIX):]:
            raise TicketError(f"{text!r}: after {LOCAL_PREFIX!r} comes a ticket directory's path")
        if not path.exists():
            raise TicketError(f"no ticket directory at {str(path)!r} (named by {text!r}): it does not exist")
        if not path.is_dir():
            raise TicketError(f"{str(path)!r} (named by {text!r}) is a file; a ticket is a directory")
        return TicketSource(path)
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
    else:
        if "@" in repo_id:  # timm's "hf-hub:user/name@revision"
            repo_id, _, tag = repo_id.partition("@")
            if not tag or "@" in tag or (revision is not None and revision != tag):
                raise TicketError(f"{text!r}: the revision after '@' must be one name and agree with "
                                  f"revision={revision!r}")
            revision = tag
        if not is_repo_id(repo_id) or "/" not in repo_id:
            raise TicketError(f"{text!r}: after {HUB_PREFIX!r} comes a Hub repo id 'user/name' (optionally "
                              "'@revision')")
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
    return TicketSource(folder, repo_id, folder.parent.parent, revision)


def redownload(found: TicketSource, **kwargs) -> TicketSource:
    """Fetch a Hub ticket again after its cached copy failed a checksum (a download cut short)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise TicketChecksumError(
            f"the cached copy of the Hub ticket {found.repo_id!r} in {str(found.directory)!r} is damaged and "
            "HF_HUB_OFFLINE is set: unset it to download the ticket again, or delete that folder")
    kwargs["revision"] = found.revision
    return resolve_ticket_source(HUB_PREFIX + found.repo_id, force_download=True, **kwargs)


def resolve_ticket(source: PathLike, **kwargs) -> Path:
    """The directory holding the ticket ``source`` names (see ``resolve_ticket_source``)."""
    return resolve_ticket_source(source, **kwargs).directory
