"""dftlite.model_card on its own: the base model's Hub id and license. The card as an export writes it
(Hub metadata, no local paths) is tested in tests/test_export.py."""

from __future__ import annotations

import shutil

from conftest import TINY_HUB_ID

from dftlite.model_card import base_license, resolve_base_id


def test_embedded_alias_records_smollm2_and_its_license():
    assert resolve_base_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_license("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct") == "apache-2.0"
    assert resolve_base_id("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"


def test_license_comes_from_the_base_card(tiny_model_dir, tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    assert base_license(str(base), TINY_HUB_ID) == "mit"
