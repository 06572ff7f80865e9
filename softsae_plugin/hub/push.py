"""`sae-lens push`: publish checkpoint folders to a Hugging Face Hub repo that `SAE.from_pretrained` loads.

SAE-Lens' own `upload_saes_to_huggingface` uploads the files SAE-Lens reads back (cfg.json, weights,
sparsity, runner config) into one folder per SAE; this command adds the training summary, the k_hat
histogram and SAEBench results next to them, and a model card at the repo root listing every SAE there.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from sae_lens import upload_saes_to_huggingface
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME

from softsae_plugin.hub.card import CARD_MARKER, EVAL_DIRNAME, SAEEntry, is_card_source, model_card, read_entry
from softsae_plugin.show.page import PAGE_FILENAME, SCREENSHOT_FILENAME
from softsae_plugin.training.guards import check_sae_folder
from softsae_plugin.training.summary import K_HAT_HISTOGRAM_FILENAME, SUMMARY_FILENAME

README = "README.md"
LOGIN_HINT = (
    "run `hf auth login`, or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)"
)
EPILOG = f"""\
what is uploaded, into the folder SAE_ID/ of the repo for each CHECKPOINT_DIR:
  cfg.json, sae_weights.safetensors, sparsity.safetensors, runner_cfg.json
      by SAE-Lens' upload_saes_to_huggingface, so SAE.from_pretrained can load them
  {SUMMARY_FILENAME}, {K_HAT_HISTOGRAM_FILENAME}, {EVAL_DIRNAME}/*.json (SAEBench results),
  {PAGE_FILENAME} and {SCREENSHOT_FILENAME} (the page of `sae-lens show` and its screenshot)
      when the checkpoint has them
and {README} at the repo root: a model card (metrics, k_hat histogram, how to load) listing every SAE in the
repo, those pushed before included. A {README} that sae-lens push did not write is kept unless
--overwrite-readme is given.

authentication: the token comes from huggingface_hub's usual places, HF_TOKEN or `hf auth login`, and needs
write access to the repo.

examples:
  sae-lens push runs/softsae-k32 --repo-id alice/smollm2-softsae
  sae-lens push runs/k16 runs/k32 runs/topk32 --repo-id alice/smollm2-softsae
  sae-lens push runs/final --repo-id alice/smollm2-softsae --sae-id layer6/k32 --private

loading (SoftSAEs need the import, which registers the architecture with SAE-Lens):
  import softsae_plugin
  from sae_lens import SAE
  sae = SAE.from_pretrained("alice/smollm2-softsae", "softsae-k32")
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sae-lens push`, whose --help documents the command."""
    parser = argparse.ArgumentParser(
        prog="sae-lens push",
        description=(
            "Publish SAE checkpoint folders (as `sae-lens train` writes them) to a Hugging Face Hub model repo,\n"
            "one folder per SAE, with a model card. SAE-Lens loads them back with\n"
            "SAE.from_pretrained(REPO_ID, SAE_ID)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        metavar="CHECKPOINT_DIR",
        help="a folder holding cfg.json and sae_weights.safetensors",
    )
    parser.add_argument(
        "--repo-id", required=True, metavar="USER/NAME", help="the Hub model repo; created if it does not exist"
    )
    parser.add_argument(
        "--sae-id",
        metavar="ID",
        help="the SAE's folder in the repo, the second argument of SAE.from_pretrained (may contain '/'); "
        "default: the checkpoint folder's name. Only with a single CHECKPOINT_DIR",
    )
    parser.add_argument(
        "--revision",
        default="main",
        metavar="REV",
        help="the branch to push to, created from main if missing (default: main). SAE.from_pretrained reads "
        "main only; the card shows how to load from another branch",
    )
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    parser.add_argument(
        "--license", metavar="ID", help="the license of the SAEs for the card's metadata, e.g. apache-2.0 or mit"
    )
    parser.add_argument(
        "--overwrite-readme", action="store_true", help=f"replace a {README} that sae-lens push did not write"
    )
    return parser


def main(argv: Sequence[str]) -> None:
    """Run `sae-lens push` with the arguments after `push`.

    Checks the checkpoints, the ids and the token before any request; the Hub's refusals (a rejected token,
    no write access) and an unreachable Hub end the command with a one-line message instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        validate_repo_id(args.repo_id)
        if args.repo_id.count("/") != 1:
            raise ValueError(f"--repo-id {args.repo_id!r}: expected USER/NAME (SAE.from_pretrained needs the '/')")
        checkpoints = checkpoint_ids(args.checkpoints, args.sae_id)
    except ValueError as err:
        parser.error(str(err))
    if constants.is_offline_mode():
        raise SystemExit("sae-lens push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
    if get_token() is None:
        raise SystemExit(f"sae-lens push: no Hugging Face token found; {LOGIN_HINT}")
    try:
        url = push(
            checkpoints,
            args.repo_id,
            revision=args.revision,
            private=args.private,
            overwrite_readme=args.overwrite_readme,
            license=args.license,
        )
    except HfHubHTTPError as err:
        raise SystemExit(_refusal_message(err, args.repo_id)) from None
    except httpx2.TransportError as err:
        raise SystemExit(
            f"sae-lens push: could not reach the Hugging Face Hub at {constants.ENDPOINT}: {err}"
        ) from None
    first = next(iter(checkpoints))
    if args.revision == constants.DEFAULT_REVISION:
        load = f"sae = SAE.from_pretrained({args.repo_id!r}, {first!r})"
    else:
        # SAE-Lens' loader downloads from the default branch only.
        load = (
            f"folder = huggingface_hub.snapshot_download({args.repo_id!r}, revision={args.revision!r}, "
            f"allow_patterns='{first}/*')\n  sae = SAE.load_from_disk(f'{{folder}}/{first}')"
        )
    print(
        f"pushed {', '.join(checkpoints)} to {url} (branch {args.revision})\n"
        f"load with:\n  import softsae_plugin\n  from sae_lens import SAE\n  {load}"
    )


def checkpoint_ids(checkpoints: Sequence[Path], sae_id: str | None = None) -> dict[str, Path]:
    """Map each SAE's folder name in the repo to its checkpoint folder, after checking both.

    The folder name is `sae_id` for a single checkpoint, else each checkpoint folder's own name. Raises
    ValueError naming the problem: a folder without SAE-Lens' files, two SAEs with the same id, or an id
    that is not a plain relative path.
    """
    if sae_id is not None and len(checkpoints) != 1:
        raise ValueError(f"--sae-id names one SAE, but {len(checkpoints)} checkpoints were given")
    ids: dict[str, Path] = {}
    for folder in checkpoints:
        check_sae_folder(folder, "checkpoint")
        name = sae_id if sae_id is not None else folder.resolve().name
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"SAE id {name!r} is not a folder name for the repo; choose one with --sae-id")
        if name in ids:
            raise ValueError(f"{ids[name]} and {folder} would both be uploaded as {name!r}; push them separately")
        ids[name] = folder
    return ids


def push(
    checkpoints: Mapping[str, Path],
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    overwrite_readme: bool = False,
    show_progress: bool = True,
    license: str | None = None,
) -> str:
    """Upload checkpoint folders (SAE id -> folder) to a Hub repo, with a model card; return the repo's URL.

    Creates the repo (and the branch) when missing, uploads SAE-Lens' files with SAE-Lens'
    `upload_saes_to_huggingface`, then in one commit the extras of each SAE (summary, histogram, SAEBench
    results; stale ones from an earlier push of the same id are deleted) and the README.md model card,
    which also lists the SAEs already in the repo, read back from their small files.
    """
    api = HfApi()
    url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    if revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    upload_saes_to_huggingface(
        {sae_id: str(folder) for sae_id, folder in checkpoints.items()},
        repo_id,
        hf_revision=revision,
        show_progress=show_progress,
        add_default_readme=False,
    )
    remote_files = api.list_repo_files(repo_id, revision=revision)
    operations: list[CommitOperationAdd | CommitOperationDelete] = []
    for sae_id, folder in checkpoints.items():
        extras = extra_files(folder)
        operations += [CommitOperationAdd(f"{sae_id}/{name}", folder / name) for name in extras]
        remote = [path.removeprefix(f"{sae_id}/") for path in remote_files if path.startswith(f"{sae_id}/")]
        stale = [name for name in remote if _is_extra(name) and name not in extras]
        operations += [CommitOperationDelete(f"{sae_id}/{name}") for name in stale]
    with tempfile.TemporaryDirectory() as tmp:
        existing, readme = _read_repo(repo_id, revision, remote_files, exclude=set(checkpoints), into=Path(tmp))
    entries = sorted(existing + [read_entry(i, f) for i, f in checkpoints.items()], key=lambda e: e.sae_id)
    if readme is None or CARD_MARKER in readme or overwrite_readme:
        card = model_card(repo_id, entries, revision, license=license)
        operations.append(CommitOperationAdd(README, card.encode()))
    else:
        print(f"sae-lens push: {README} in {repo_id} was not written by sae-lens push; kept (see --overwrite-readme)")
    if operations:
        api.create_commit(
            repo_id,
            operations,
            commit_message=f"Add model card and training summaries for {', '.join(checkpoints)}",
            revision=revision,
        )
    return str(url)


def extra_files(folder: Path) -> list[str]:
    """The files `sae-lens push` uploads beside SAE-Lens' own, relative to `folder` ('/'-separated).

    These are the training summary, the k_hat histogram, the `sae-lens show` page and its screenshot, and
    SAEBench's JSON results under eval/, when present.
    """
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(name for name in names if _is_extra(name))


def _is_extra(name: str) -> bool:
    # SAE-Lens' upload helper owns its own files; every other file the card reads is ours to upload.
    return is_card_source(name) and name not in (SAE_CFG_FILENAME, RUNNER_CFG_FILENAME)


def _read_repo(
    repo_id: str, revision: str, remote_files: Sequence[str], *, exclude: set[str], into: Path
) -> tuple[list[SAEEntry], str | None]:
    # Only the small files the card needs are downloaded, never weights: a push into a repo of many SAEs
    # costs one listing plus a few kilobytes per SAE.
    folders = {path[: -len(SAE_CFG_FILENAME) - 1] for path in remote_files if path.endswith(f"/{SAE_CFG_FILENAME}")}
    folders -= exclude
    wanted = [path for path in remote_files if path == README or _feeds_card(path, folders)]
    for path in wanted:
        hf_hub_download(repo_id, path, revision=revision, local_dir=into)
    readme = into / README
    entries = [read_entry(folder, into / folder) for folder in sorted(folders)]
    return entries, readme.read_text() if readme.exists() else None


def _feeds_card(path: str, folders: set[str]) -> bool:
    return any(path.startswith(f"{folder}/") and is_card_source(path[len(folder) + 1 :]) for folder in folders)


def _refusal_message(err: HfHubHTTPError, repo_id: str) -> str:
    status = err.response.status_code if err.response is not None else None
    if status == 401:
        return f"sae-lens push: the Hugging Face Hub rejected your token (401 Unauthorized); {LOGIN_HINT}"
    if status == 403:
        return (
            f"sae-lens push: your token may not write to {repo_id} (403 Forbidden); use a token with write "
            f"access to that namespace, or push to a repo under your own user name"
        )
    return f"sae-lens push: the Hugging Face Hub refused the upload to {repo_id}: {str(err).strip().splitlines()[0]}"
