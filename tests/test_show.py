"""`sae-lens show`: the page of text shaded by k_hat, checked in a real browser against the SAE's Python API.

Two small SAEs (SoftSAE and TopK) are trained on a few thousand of SmolLM2-135M's real activations; the command
writes their page for two prompts, headless Debian Chromium opens it, the mouse hovers a token, and the panel's
numbers are compared with `sae.encode` and `sae.predict_k` on the same text. Without chromium, chromedriver or
selenium the browser tests skip, saying how to install them (`make setup` does, as root).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

from softsae_plugin import SoftTrainingSAEConfig, train_on_activations
from softsae_plugin.cli import main as cli_main
from softsae_plugin.offline.smollm2 import SMOLLM2_ID, load_local_model
from softsae_plugin.offline.text import english_text
from softsae_plugin.show import browser
from softsae_plugin.show.page import PALETTE, contrast_ratio, text_colour, write_page

pytestmark = pytest.mark.slow
HOOK = "blocks.1.hook_resid_post"
PROMPTS = [
    "The cat sat on the mat, and then it slept for most of the afternoon.",
    "Photosynthesis turns light into chemical energy in <b>chloroplasts</b> & ends with </script> tags.",
]
needs_browser = pytest.mark.skipif(browser.missing() is not None, reason=f"{browser.missing()}")


@pytest.fixture(scope="module")
def model() -> Any:
    return load_local_model(SMOLLM2_ID, first_n_layers=2)


@torch.no_grad()
def _activations(model: Any, text: str) -> torch.Tensor:
    """The hook's activations of `text` behind the BOS token, BOS left out: what the page shows."""
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=HOOK, stop_at_layer=2)
    return cache[HOOK][0, 1:]


@pytest.fixture(scope="module")
def saes(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A SoftSAE and a TopK SAE trained briefly on ~3,000 tokens of real English Wikipedia at HOOK (their folders),
    and the first 40 of those activations."""
    texts = english_text(split="train", max_docs=24)["text"]
    acts = torch.cat([_activations(model, text) for text in texts])
    root = tmp_path_factory.mktemp("show_saes")
    metadata = SAEMetadata(model_name=SMOLLM2_ID, hook_name=HOOK, context_size=128, prepend_bos=True)
    kwargs = dict(batch_size=128, training_steps=60, progress=False, seed=0, heldout_fraction=0.0)
    soft = SoftTrainingSAEConfig(d_in=576, d_sae=512, k=8, k_max=24, metadata=metadata)
    train_on_activations(acts, soft, output_path=root / "softsae", **kwargs)
    topk = TopKTrainingSAEConfig(d_in=576, d_sae=512, k=8, metadata=metadata)
    train_on_activations(acts, topk, output_path=root / "topk", **kwargs)
    return {"softsae": root / "softsae", "topk": root / "topk", "acts": acts[:40]}


@pytest.fixture(scope="module")
def driver() -> Any:
    with browser.chromium() as chromium:
        yield chromium


def _page_data(page: Path) -> dict[str, Any]:
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.DOTALL)
    return json.loads(block.group(1))


def _close(shown: str, expected: float) -> bool:
    # The page prints four significant digits.
    return abs(float(shown) - expected) <= 6e-4 * max(abs(expected), 1e-3)


@needs_browser
def test_panel_shows_the_api_values_of_the_hovered_token(saes, model, driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page, png = tmp_path / "view.html", tmp_path / "view.png"
    argv = ["show", str(saes["softsae"]), "--sae", str(saes["topk"]), "--out", str(page), "--screenshot", str(png)]
    cli_main([*argv, *(arg for prompt in PROMPTS for arg in ("--prompt", prompt))])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    soft, topk = SAE.load_from_disk(str(saes["softsae"])), SAE.load_from_disk(str(saes["topk"]))
    acts = [_activations(model, prompt) for prompt in PROMPTS]
    with torch.no_grad():
        k_hat = [soft.predict_k(a) for a in acts]
        soft_codes, topk_codes = torch.cat([soft.encode(a) for a in acts]), torch.cat([topk.encode(a) for a in acts])
    # The second prompt's highest-k_hat token: a token of the second paragraph, with the most features.
    first_len = acts[0].shape[0]
    hovered = first_len + int(k_hat[1].argmax())
    expected_tokens = [model.tokenizer.decode([t]) for p in PROMPTS for t in model.to_tokens(p)[0, 1:].tolist()]
    assert _page_data(page)["tokens"] == expected_tokens
    # Self-contained: nothing is fetched (no src, href or url() anywhere in the file).
    assert not re.search(r"\b(src|href)\s*=|url\(", page.read_text())

    driver.get(page.resolve().as_uri())
    browser.wait_rendered(driver)
    text = driver.find_element(By.ID, "text")
    assert len(text.find_elements(By.CSS_SELECTOR, ".t")) == len(expected_tokens)
    # Markup in the text is shown as text, not interpreted; each row's cell holds the token.
    for row in (1, 2):
        shown = driver.execute_script(
            f"return Array.from(document.querySelectorAll('#text .t > .c:nth-child({row})'), c => c.textContent)"
        )
        assert shown == [token.replace("\n", "\u21b5") for token in expected_tokens]
    browser.hover(driver, hovered)
    panel = driver.find_element(By.ID, "panel")
    assert panel.get_attribute("data-token") == str(hovered)

    soft_row = panel.find_element(By.CSS_SELECTOR, 'section.row[data-row="0"]')
    assert _close(soft_row.find_element(By.CSS_SELECTOR, ".value").text, float(k_hat[1].max()))
    codes = soft_codes[hovered]
    kept = codes.nonzero().flatten()
    kept = kept[codes[kept].argsort(descending=True)].tolist()
    assert 1 <= len(kept) <= soft.cfg.k_max
    assert soft_row.find_element(By.CSS_SELECTOR, ".l0").text == str(len(kept))
    rows = soft_row.find_elements(By.CSS_SELECTOR, "tr[data-feature]")
    assert [int(r.find_element(By.CSS_SELECTOR, ".feat").text) for r in rows] == kept
    for r, feature in zip(rows, kept, strict=True):
        assert _close(r.find_element(By.CSS_SELECTOR, ".act").text, float(codes[feature]))
    # The strongest feature's first top token is its largest activation anywhere in the text.
    first_top = rows[0].find_element(By.CSS_SELECTOR, "button.go b").text
    assert _close(first_top, float(soft_codes[:, kept[0]].max()))

    topk_row = panel.find_element(By.CSS_SELECTOR, 'section.row[data-row="1"]')
    assert topk_row.find_element(By.CSS_SELECTOR, ".value").text == str(topk.cfg.k)
    topk_kept = topk_codes[hovered].nonzero().flatten()
    topk_kept = topk_kept[topk_codes[hovered][topk_kept].argsort(descending=True)].tolist()
    assert [int(r.text) for r in topk_row.find_elements(By.CSS_SELECTOR, ".feat")] == topk_kept

    # Keyboard: the arrow keys move the selection one token, End goes to the last.
    text.send_keys(Keys.ARROW_RIGHT)
    browser.wait_selected(driver, hovered + 1)
    text.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    browser.wait_selected(driver, hovered - 1)
    text.send_keys(Keys.END)
    browser.wait_selected(driver, len(expected_tokens) - 1)
    # A ranked entry is a button that selects its token.
    lowest = json.loads(driver.execute_script("return document.getElementById('data').textContent"))["rows"][0]
    driver.find_element(By.CSS_SELECTOR, "#ranked .rank button.go").click()
    browser.wait_selected(driver, lowest["ranked"]["low"][0])
    # The legend numbers its shades from 0 up to the top of the scale, k_max.
    legend = [float(s.text) for s in driver.find_elements(By.CSS_SELECTOR, ".legend .swatch, .legend .end")]
    assert legend[0] == 0 and legend == sorted(legend) and legend[-1] == soft.cfg.k_max


@needs_browser
def test_a_page_of_20000_tokens_renders(driver, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_show", Path(__file__).parents[1] / "eval" / "bench_show.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.synthetic_page(20_000)
    page = write_page(data, tmp_path / "big.html")
    start = time.perf_counter()
    driver.get(page.resolve().as_uri())
    render_ms = browser.wait_rendered(driver)
    print(f"20,000 tokens, {page.stat().st_size / 1e6:.1f} MB: drawn {render_ms:.0f} ms after navigation start "
          f"({1000 * (time.perf_counter() - start):.0f} ms wall)")  # fmt: skip
    from selenium.webdriver.common.by import By

    assert len(driver.find_elements(By.CSS_SELECTOR, "#text .t")) == 20_000
    browser.hover(driver, 19_999)
    panel = driver.find_element(By.ID, "panel")
    features = panel.find_elements(By.CSS_SELECTOR, 'section.row[data-row="0"] .feat')
    assert [int(f.text) for f in features] == data.rows[0].features[19_999]


def test_activation_inputs_are_listed_by_k_hat(saes, tmp_path: Path) -> None:
    acts = saes["acts"]
    np.save(tmp_path / "acts.npy", acts.numpy())
    (tmp_path / "texts.txt").write_text("".join(f"input {i}\n" for i in range(len(acts))))
    page = tmp_path / "inputs.html"
    cli_main(["show", str(saes["softsae"]), "--activations", str(tmp_path / "acts.npy"), "--text",
              str(tmp_path / "texts.txt"), "--out", str(page)])  # fmt: skip
    data = _page_data(page)
    with torch.no_grad():
        k_hat = SAE.load_from_disk(str(saes["softsae"])).predict_k(acts)
    assert data["mode"] == "inputs" and data["tokens"] == [f"input {i}" for i in range(len(acts))]
    assert data["order"] == sorted(range(len(acts)), key=lambda i: (float(k_hat[i]), i))
    assert all(_close(str(v), float(k)) for v, k in zip(data["rows"][0]["values"], k_hat, strict=True))


def test_text_files_and_held_out_paragraphs(saes, model, tmp_path: Path) -> None:
    # A --text file's paragraphs (blank-line separated, lines joined) become the page's paragraphs.
    first, rest = PROMPTS[0].split(" ", 1)
    (tmp_path / "essay.txt").write_text(f"{first}\n{rest}\n\n\n{PROMPTS[1]}\n")
    cli_main(["show", str(saes["softsae"]), "--text", str(tmp_path / "essay.txt"), "--out", str(tmp_path / "a.html")])
    data = _page_data(tmp_path / "a.html")
    lengths = [len(model.to_tokens(prompt)[0]) - 1 for prompt in PROMPTS]
    assert data["docs"] == [0] * lengths[0] + [1] * lengths[1]
    # What `make quickstart` runs: the first held-out paragraph, split into the SAE's 128-token contexts.
    cli_main(["show", str(saes["softsae"]), "--heldout", "1", "--out", str(tmp_path / "b.html")])
    data = _page_data(tmp_path / "b.html")
    paragraph = english_text(split="heldout", max_docs=1)["text"][0]
    ids = model.tokenizer(paragraph, add_special_tokens=False)["input_ids"]
    assert data["tokens"] == [model.tokenizer.decode([i]) for i in ids]
    assert data["docs"] == [i // 127 for i in range(len(ids))]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["show", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_named(saes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    soft = str(saes["softsae"])
    out = str(tmp_path / "view.html")
    assert "give an SAE folder" in _error(["--prompt", "hi", "--out", out], capsys)
    assert "has no cfg.json" in _error([str(tmp_path), "--prompt", "hi", "--out", out], capsys)
    assert "--out view.png: expected a file name ending in .html" in _error(
        [soft, "--prompt", "hi", "--out", "view.png"], capsys
    )
    np.save(tmp_path / "acts.npy", saes["acts"].numpy())
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    acts_args = ["--activations", str(tmp_path / "acts.npy"), "--text"]
    assert "--text has 3 lines for 40 activation rows" in _error(
        [soft, *acts_args, str(tmp_path / "three.txt"), "--out", out], capsys
    )
    np.save(tmp_path / "narrow.npy", np.zeros((3, 5), dtype=np.float32))
    assert "reads d_in=576, but the activation rows have 5 values" in _error(
        [soft, "--activations", str(tmp_path / "narrow.npy"), "--text", str(tmp_path / "three.txt"), "--out", out],
        capsys,
    )
    unknown = tmp_path / "no-model"
    shutil.copytree(saes["softsae"], unknown)
    cfg = json.loads((unknown / "cfg.json").read_text())
    del cfg["metadata"]["model_name"]
    (unknown / "cfg.json").write_text(json.dumps(cfg))
    assert "metadata.model_name is missing" in _error([str(unknown), "--prompt", "hi", "--out", out], capsys)


def test_every_shade_has_readable_text() -> None:
    # WCAG AA for normal text: a contrast of at least 4.5 between each shade and the text drawn on it.
    assert all(contrast_ratio(colour, text_colour(colour)) >= 4.5 for colour in PALETTE)
