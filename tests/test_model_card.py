"""dftlite.model_card on its own: the base model's Hub id and license, the method's settings on the card.
The card as an export writes it (Hub metadata, no local paths) is tested in tests/test_export.py."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import TINY_HUB_ID

from dftlite.dft_config import DFTConfig
from dftlite.model_card import base_license, model_card, resolve_base_id


def test_embedded_alias_records_smollm2_and_its_license():
    assert resolve_base_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_license("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct") == "apache-2.0"
    assert resolve_base_id("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"


def test_license_comes_from_the_base_card(tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    assert base_license(str(base), TINY_HUB_ID) == "mit"


@pytest.mark.parametrize("method, shown", [("dft2", True), ("dft", True), ("simpo_sft", True), ("simpo", False)])
def test_the_card_shows_lambda_for_every_method_that_reads_it(method, shown):
    # DFT2's SFT anchor λ (sft_weight, default 2.5) belongs on its card as much as SimPO+SFT's
    config = DFTConfig(output_dir="runs/x", method=method, use_cpu=True, report_to="none")
    card = model_card(base_name="org/base", base_id="org/base", license_=None, relation="adapter", repo="org/adapter",
                      adapter_config={}, training_config=dataclasses.asdict(config), metrics={})
    assert (f"| `sft_weight` | `{config.sft_weight}` |" in card) is shown
    assert ("| `tau` |" in card) is method.startswith("dft")
