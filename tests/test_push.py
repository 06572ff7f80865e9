"""`sae-lens push` and loading back with `SAE.from_pretrained`, against a stand-in for the Hub's HTTP API.

The Hub is out of reach here, so huggingface_hub's HTTP client is pointed at `FakeHub` through its own
`set_client_factory` hook: everything above the HTTP layer (huggingface_hub's upload and download code,
SAE-Lens' upload helper and loader, the plugin) runs for real.
"""

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub import set_client_factory
from huggingface_hub.utils import _http as hf_http
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAEConfig

from softsae_plugin import SoftSAE, SoftTrainingSAEConfig, train_on_activations
from softsae_plugin.hub.card import CARD_MARKER, model_card, read_entry
from softsae_plugin.hub.push import main as push_main
from softsae_plugin.show.page import PageData, Row, write_page

SAE_LENS = str(Path(sys.executable).with_name("sae-lens"))
TOKEN = "hf_test_write_token"
HUB = "https://huggingface.co"
METADATA = {"model_name": "tiny-test-model", "hook_name": "blocks.0.hook_resid_post"}
# A SAEBench core result as SAEBench writes it (top-level keys and metric categories of its schema), trimmed.
CORE_RESULT = {
    "eval_type_id": "core",
    "eval_config": {"model_name": "tiny-test-model", "batch_size_prompts": 16},
    "eval_id": "0f3c",
    "datetime_epoch_millis": 1767225600000,
    "eval_result_metrics": {
        "model_behavior_preservation": {"kl_div_score": 0.9123, "kl_div_with_ablation": 5.25, "kl_div_with_sae": 0.46},
        "reconstruction_quality": {"explained_variance": 0.8765, "mse": 1.5, "cossim": 0.93},
        "sparsity": {"l0": 4.125, "l1": 21.0},
    },
    "eval_result_details": [],
    "sae_lens_id": "softsae_k4",
}


class FakeHub:
    """The Hub endpoints that `sae-lens push` and `SAE.from_pretrained` call, served from memory.

    Repos are dicts of branch -> {path: bytes}; every commit is recorded. Writes need the Bearer token
    given at construction; a wrong token gets the 401 the real Hub answers.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[tuple[str, str, str, list[str]]] = []
        self.requests: list[str] = []
        self.heads: dict[tuple[str, str], str] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}  # commit sha -> files, so a sha works as a revision

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The files of a branch of a repo, path -> content (live: edits change the repo)."""
        return self.repos[repo_id][branch]

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        """Answer one request of huggingface_hub's HTTP client, as the Hub's API would."""
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        auth = request.headers.get("authorization")
        if auth is not None and auth != f"Bearer {self.token}":
            return self._error(401, None, "Invalid credentials in Authorization header")
        writes = request.method == "POST" and path != "/api/validate-yaml"
        if writes and auth is None:
            return self._error(401, None, "Authorization header is required")
        # (method, path pattern, handler, whether the revision in the path must exist already)
        routes = [
            ("POST", r"/api/repos/create", self._create_repo, False),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._repo_info, True),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self._create_branch, False),
            ("POST", r"/api/validate-yaml", self._validate_yaml, False),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload, True),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit, True),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?", self._tree, True),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve, True),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve, True),
        ]
        for method, pattern, route, needs_rev in routes:
            match = re.fullmatch(pattern, path)
            if request.method != method or match is None:
                continue
            params = {"repo": None, "file": None, **match.groupdict()}
            params["rev"] = params.get("rev") or "main"
            repo = params["repo"]
            if repo is not None and (repo not in self.repos or (self.private[repo] and auth is None)):
                return self._error(404, "RepoNotFound", "Repository not found")
            if repo is not None and needs_rev and self._files_at(repo, params["rev"]) is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            return route(request, **params)
        return self._error(404, None, f"no fake endpoint for {request.method} {path}")

    @staticmethod
    def _error(status: int, code: str | None, message: str) -> httpx2.Response:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        return httpx2.Response(status, headers=headers, json={"error": message})

    def _files_at(self, repo: str, rev: str) -> dict[str, bytes] | None:
        return self.repos[repo].get(rev, self.snapshots.get(rev))

    def _head(self, repo: str, rev: str) -> str:
        return self.heads.get((repo, rev), rev)

    def _new_commit(self, repo: str, rev: str, message: str, paths: list[str]) -> str:
        self.commits.append((repo, rev, message, paths))
        sha = hashlib.sha1(f"{len(self.commits)}".encode()).hexdigest()
        self.heads[(repo, rev)] = sha
        self.snapshots[sha] = dict(self.repos[repo][rev])
        return sha

    def _create_repo(self, request: httpx2.Request, **_: str | None) -> httpx2.Response:
        body = json.loads(request.content)
        repo = f"{body['organization']}/{body['name']}"
        if repo in self.repos:
            # Like the Hub, the conflict names the existing repo's URL (create_repo(exist_ok=True) returns it).
            message = "You already created this model repo"
            return httpx2.Response(
                409, headers={"X-Error-Message": message}, json={"error": message, "url": f"{HUB}/{repo}"}
            )
        # The Hub starts every repo with one commit holding .gitattributes.
        self.repos[repo] = {"main": {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}}
        self.private[repo] = body.get("visibility") == "private"
        self._new_commit(repo, "main", "initial commit", [".gitattributes"])
        return httpx2.Response(200, json={"url": f"{HUB}/{repo}", "name": repo})

    def _repo_info(self, request: httpx2.Request, repo: str, rev: str, **_: str | None) -> httpx2.Response:
        files = self._files_at(repo, rev)
        siblings = [{"rfilename": name} for name in sorted(files)]
        sha = self._head(repo, rev)
        return httpx2.Response(200, json={"id": repo, "sha": sha, "private": self.private[repo], "siblings": siblings})

    def _create_branch(self, request: httpx2.Request, repo: str, rev: str, **_: str | None) -> httpx2.Response:
        if rev in self.repos[repo]:
            return self._error(409, None, "Reference already exists")
        self.repos[repo][rev] = dict(self.repos[repo]["main"])
        self.heads[(repo, rev)] = self.heads[(repo, "main")]
        return httpx2.Response(200, json={})

    def _validate_yaml(self, request: httpx2.Request, **_: str | None) -> httpx2.Response:
        content = json.loads(request.content)["content"]
        front = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        if front is None or not isinstance(yaml.safe_load(front.group(1)), dict):
            return httpx2.Response(400, json={"errors": [{"message": "invalid metadata"}], "warnings": []})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _preupload(self, request: httpx2.Request, **_: str | None) -> httpx2.Response:
        # Every file goes inline in the commit ("regular"), so no LFS or Xet storage has to be faked.
        files = json.loads(request.content)["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        return httpx2.Response(200, json={"files": modes})

    def _commit(self, request: httpx2.Request, repo: str, rev: str, **_: str | None) -> httpx2.Response:
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
        files = self.repos[repo][rev]
        header, touched = lines[0]["value"], []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                del files[value["path"]]
            else:
                raise AssertionError(f"the fake Hub does not handle commit lines of kind {line['key']!r}")
            touched.append(("-" if line["key"] == "deletedFile" else "") + value["path"])
        sha = self._new_commit(repo, rev, header["summary"], touched)
        return httpx2.Response(200, json={"commitUrl": f"{HUB}/{repo}/commit/{sha}", "commitOid": sha})

    def _tree(self, request: httpx2.Request, repo: str, rev: str, **_: str | None) -> httpx2.Response:
        files = self._files_at(repo, rev)
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(files.items())
        ]
        return httpx2.Response(200, json=entries)

    def _resolve(self, request: httpx2.Request, repo: str, rev: str, file: str) -> httpx2.Response:
        data = self._files_at(repo, rev).get(file)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        headers = {
            "X-Repo-Commit": self._head(repo, rev),
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers)
        return httpx2.Response(200, headers=headers, content=data)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh FakeHub behind huggingface_hub's client, with a write token in HF_TOKEN and a private cache."""
    fake = FakeHub(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # `make test` runs offline; this test talks only to its own in-memory Hub.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle), follow_redirects=True))
    yield fake
    # huggingface_hub keeps its default factory private; restoring it keeps later tests on the real client.
    set_client_factory(hf_http.default_client_factory)


def _activations() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2048, 16, generator=gen) * torch.rand(2048, 1, generator=gen)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A SoftSAE checkpoint with a SAEBench result under eval/, and a TopK baseline, both from real training."""
    root = tmp_path_factory.mktemp("checkpoints")
    x = _activations()
    kwargs = dict(batch_size=64, training_steps=50, progress=False)
    soft_cfg = SoftTrainingSAEConfig(d_in=16, d_sae=64, k=4, metadata=SAEMetadata(**METADATA))
    train_on_activations(x, soft_cfg, output_path=root / "softsae_k4", **kwargs)
    (root / "softsae_k4" / "eval").mkdir()
    (root / "softsae_k4" / "eval" / "core_eval_results.json").write_text(json.dumps(CORE_RESULT))
    # `sae-lens eval` also leaves its own summary row there: uploaded, but not a SAEBench result.
    (root / "softsae_k4" / "eval" / "summary.json").write_text(json.dumps({"model_name": "tiny-test-model", "L0": 4.1}))
    topk_cfg = TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, metadata=SAEMetadata(**METADATA))
    train_on_activations(x, topk_cfg, output_path=root / "topk_run", **kwargs)
    return {"softsae": root / "softsae_k4", "topk": root / "topk_run"}


def _card(hub: FakeHub) -> tuple[dict, str]:
    text = hub.files("user/name")["README.md"].decode()
    front, body = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL).groups()
    return yaml.safe_load(front), body


def test_push_then_from_pretrained_round_trip(hub: FakeHub, checkpoints: dict[str, Path], capsys) -> None:
    soft = checkpoints["softsae"]
    push_main([str(soft), "--repo-id", "user/name", "--private"])

    assert hub.private["user/name"]
    sae_lens_files = {"softsae_k4/cfg.json", "softsae_k4/sae_weights.safetensors", "softsae_k4/sparsity.safetensors"}
    extras = {
        "softsae_k4/training_summary.json",
        "softsae_k4/k_hat_histogram.png",
        "softsae_k4/eval/core_eval_results.json",
        "softsae_k4/eval/summary.json",
    }
    files = hub.files("user/name")
    assert set(files) == sae_lens_files | extras | {".gitattributes", "README.md"}
    for path in sae_lens_files | extras:
        assert files[path] == (soft / path.removeprefix("softsae_k4/")).read_bytes(), path
    # SAE-Lens' helper commits its own files; the extras and the card follow in one commit.
    assert [set(paths) for _, _, _, paths in hub.commits[1:]] == [sae_lens_files, extras | {"README.md"}]

    metadata, body = _card(hub)
    assert metadata == {
        "library_name": "saelens",
        "tags": ["sparse-autoencoder", "softsae", "sae-lens", "tiny-test-model"],
    }
    summary = json.loads((soft / "training_summary.json").read_text())
    assert CARD_MARKER in body
    assert "pip install softsae-plugin" in body
    assert "import softsae_plugin  # registers the softsae architecture" in body
    assert 'SAE.from_pretrained("user/name", "softsae_k4")' in body
    assert "| hook | `blocks.0.hook_resid_post` |" in body
    assert "| d_in | 16 |" in body and "| d_sae | 64 |" in body
    assert "| k | 4 |" in body
    assert f"| k_max | {summary['k_max']} |" in body
    assert f"| FVE (fraction of variance explained) | {summary['fve']:.4f} |" in body
    assert f"| mean L0 | {summary['mean_l0']:.2f} |" in body
    assert f"mean {summary['k_hat']['mean']:.2f} (std {summary['k_hat']['std']:.2f})" in body
    assert "![k_hat histogram of softsae_k4](softsae_k4/k_hat_histogram.png)" in body
    # SAEBench: the headline metrics its schema marks for display, not every number in the file.
    assert "| core | KL Divergence Score | 0.9123 |  |" in body
    assert "| core | Explained Variance | 0.8765 |  |" in body
    assert "| core | L0 Sparsity | 4.125 |  |" in body
    assert "kl_div_with_ablation" not in body and "5.25" not in body
    assert "SAE.from_pretrained('user/name', 'softsae_k4')" in capsys.readouterr().out

    original = SAE.load_from_disk(soft)
    loaded = SAE.from_pretrained("user/name", "softsae_k4")
    assert isinstance(loaded, SoftSAE)
    x = _activations()[:256]
    codes = loaded.encode(x)
    assert torch.equal(codes, original.encode(x))
    assert torch.equal(loaded.decode(codes), original.decode(codes))
    assert torch.equal(loaded.predict_k(x), original.predict_k(x))


def test_push_puts_the_show_page_and_its_screenshot_on_the_card(
    hub: FakeHub, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    soft = tmp_path / "softsae_k4"
    shutil.copytree(checkpoints["softsae"], soft)
    row = Row("softsae", "k_hat", [3.5, 4.25], [4, 4], [[1, 2, 3, 4], [4, 3, 2, 1]], [[4.0, 3.0, 2.0, 1.0]] * 2)
    write_page(PageData("two tokens", [" a", " b"], [row]), soft / "show.html")
    screenshot = b"\x89PNG\r\n\x1a\n" + bytes(64)  # push uploads the bytes as they are
    (soft / "show.png").write_bytes(screenshot)
    push_main([str(soft), "--repo-id", "user/name"])

    files = hub.files("user/name")
    assert files["softsae_k4/show.html"] == (soft / "show.html").read_bytes()
    assert files["softsae_k4/show.png"] == screenshot
    linked_image = "[![features per token of softsae_k4](softsae_k4/show.png)](softsae_k4/show.html)"
    assert linked_image in _card(hub)[1]
    # Pushing another SAE later still shows this one's page, read back from the repo; the baseline has none.
    push_main([str(checkpoints["topk"]), "--repo-id", "user/name", "--sae-id", "topk"])
    _, body = _card(hub)
    assert linked_image in body and "features per token of topk" not in body


def test_second_push_lists_both_saes_and_replaces_stale_extras(
    hub: FakeHub, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    push_main([str(checkpoints["softsae"]), "--repo-id", "user/name"])
    # The same SoftSAE again without its SAEBench result, beside a TopK baseline under a chosen id.
    soft_again = tmp_path / "softsae_k4"
    shutil.copytree(checkpoints["softsae"], soft_again, ignore=shutil.ignore_patterns("eval"))
    push_main([str(checkpoints["topk"]), "--repo-id", "user/name", "--sae-id", "baselines/topk_k4"])
    push_main([str(soft_again), "--repo-id", "user/name"])

    files = hub.files("user/name")
    assert not any(path.startswith("softsae_k4/eval/") for path in files)
    assert {path for path in files if path.startswith("baselines/")} == {
        "baselines/topk_k4/cfg.json",
        "baselines/topk_k4/sae_weights.safetensors",
        "baselines/topk_k4/sparsity.safetensors",
        "baselines/topk_k4/training_summary.json",
    }
    _, body = _card(hub)
    assert "## SAEs in this repository (2)" in body
    topk_section = body.split("### `baselines/topk_k4`")[1].split("### ")[0]
    assert "| architecture | topk |" in topk_section
    assert "k_hat" not in topk_section and "SAEBench" not in topk_section
    assert "![k_hat histogram of softsae_k4]" in body and "SAEBench" not in body

    loaded = SAE.from_pretrained("user/name", "baselines/topk_k4")
    assert isinstance(loaded, TopKSAE)
    x = _activations()[:64]
    assert torch.equal(loaded.encode(x), SAE.load_from_disk(checkpoints["topk"]).encode(x))


def test_push_to_a_branch_loads_as_the_card_says(hub: FakeHub, checkpoints: dict[str, Path]) -> None:
    push_main([str(checkpoints["softsae"]), "--repo-id", "user/name", "--revision", "v2"])
    assert set(hub.files("user/name")) == {".gitattributes"}  # main is untouched
    card = hub.files("user/name", "v2")["README.md"].decode()
    snippet = re.search(r"```python\n(from huggingface_hub import snapshot_download.*?)```", card, re.DOTALL)
    namespace: dict = {"SAE": SAE}
    exec(snippet.group(1), namespace)
    x = _activations()[:64]
    assert torch.equal(namespace["sae"].encode(x), SAE.load_from_disk(checkpoints["softsae"]).encode(x))


def test_handwritten_readme_is_kept(hub: FakeHub, checkpoints: dict[str, Path], capsys) -> None:
    push_main([str(checkpoints["topk"]), "--repo-id", "user/name", "--sae-id", "topk_k4"])
    hub.files("user/name")["README.md"] = b"# My own notes\n"
    push_main([str(checkpoints["softsae"]), "--repo-id", "user/name"])
    assert hub.files("user/name")["README.md"] == b"# My own notes\n"
    assert "--overwrite-readme" in capsys.readouterr().out
    push_main([str(checkpoints["softsae"]), "--repo-id", "user/name", "--overwrite-readme"])
    assert "## SAEs in this repository (2)" in _card(hub)[1]


def test_missing_token_says_how_to_log_in(
    hub: FakeHub, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(SystemExit) as exit_info:
        push_main([str(checkpoints["softsae"]), "--repo-id", "user/name"])
    message = str(exit_info.value.code)
    assert "no Hugging Face token" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert hub.requests == []


def test_rejected_token_is_a_clear_message(
    hub: FakeHub, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    with pytest.raises(SystemExit) as exit_info:
        push_main([str(checkpoints["softsae"]), "--repo-id", "user/name"])
    message = str(exit_info.value.code)
    assert "rejected your token" in message and "hf auth login" in message
    assert hub.repos == {}


def test_bad_arguments_fail_before_any_request(
    hub: FakeHub, checkpoints: dict[str, Path], tmp_path: Path, capsys
) -> None:
    cases = [
        ([str(tmp_path), "--repo-id", "user/name"], "no cfg.json or sae_weights.safetensors"),
        (
            [str(checkpoints["softsae"]), str(checkpoints["topk"]), "--repo-id", "user/name", "--sae-id", "a"],
            "--sae-id",
        ),
        ([str(checkpoints["softsae"]), "--repo-id", "name-without-user"], "USER/NAME"),
        ([str(checkpoints["softsae"]), "--repo-id", "user/name", "--sae-id", "../up"], "not a folder name"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            push_main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err, argv
    assert hub.requests == []


def test_help_documents_the_command() -> None:
    result = subprocess.run([SAE_LENS, "push", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for text in ("CHECKPOINT_DIR", "--repo-id USER/NAME", "--sae-id", "--revision", "--private", "HF_TOKEN"):
        assert text in result.stdout, text
    assert "hf auth login" in result.stdout
    assert "SAE.from_pretrained(" in result.stdout


def test_card_shows_each_metric_with_its_spread_labels_and_decoder_note(tmp_path, checkpoints) -> None:
    """What `sae-lens eval` leaves in eval/summary.json (means over seeds, labels) reaches the card, and the card's
    metadata names the license given and the base model where it is known."""
    soft = tmp_path / "soft"
    shutil.copytree(checkpoints["softsae"], soft, ignore=shutil.ignore_patterns("eval"))
    summary = json.loads((soft / "training_summary.json").read_text())
    (soft / "training_summary.json").write_text(json.dumps({**summary, "model_name": "smollm2-135m-instruct-q4_1"}))
    stand_in = "pipeline check, not a benchmark: stand-in datasets from --datasets-dir"
    metrics = {
        "scr_metric_threshold_2": {"eval_type_id": "scr", "mean": 0.04, "std": 0.012, "values": [0.03, 0.05, 0.04],
                                   "labels": [stand_in]},
        "mean_absorption_fraction_score": {"eval_type_id": "absorption_first_letter", "mean": 0.2, "std": None,
                                           "values": [0.2], "labels": []},
    }  # fmt: skip
    (soft / "eval").mkdir()
    row = {"SAE": "soft", "n_seeds": 3, "decoder": "folded to unit-norm rows before SAEBench (rows of norm 0.2)"}
    (soft / "eval" / "summary.json").write_text(json.dumps({**row, "metrics": metrics}))
    card = model_card("user/name", [read_entry("soft", soft)], license="apache-2.0")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert (
        "| scr | scr_metric_threshold_2 | 0.04 ± 0.012 (3 seeds) | pipeline check, not a benchmark: stand-in "
        "datasets from --datasets-dir; decoder: folded to unit-norm rows before SAEBench (rows of norm 0.2) |"
    ) in card
    assert "| absorption_first_letter | mean_absorption_fraction_score | 0.2 | decoder: folded" in card
